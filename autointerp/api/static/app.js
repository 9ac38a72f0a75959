// autointerp pages: small progressive enhancements, no framework. Everything written into the page goes through
// textContent (never innerHTML), so no text from the store is ever parsed as HTML.
"use strict";

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

// Live job progress: poll the job's status while it is not final.
function watchJob(box) {
  const url = box.dataset.url;
  const fmt = (x, d) => (x === null || x === undefined ? "" : Number(x).toFixed(d));
  async function tick() {
    let st;
    try {
      const r = await fetch(url, {headers: {"Accept": "application/json"}});
      if (!r.ok) throw new Error(r.status);
      st = await r.json();
    } catch (e) {
      document.getElementById("job-updated").textContent = "Could not reach the server; retrying.";
      return setTimeout(tick, 4000);
    }
    const badge = document.getElementById("job-status");
    badge.textContent = st.status;
    badge.className = "badge " + st.status;
    document.getElementById("job-latents").textContent = st.latents_finished + " / " + st.latents;
    document.getElementById("job-cost").textContent = fmt(st.spend.cost_usd, 4);
    document.getElementById("job-rate").textContent = st.rate_per_s ? fmt(st.rate_per_s, 2) + " latents/s" : "";
    document.getElementById("job-eta").textContent = st.eta_s ? "ETA " + Math.round(st.eta_s) + "s" : "";
    const ex = st.extraction, exLine = document.getElementById("job-extraction");
    if (ex && exLine) {
      exLine.hidden = false;
      exLine.textContent = "extraction: " + ex.shards_done + " / " + ex.shards + " shards · " +
        Number(ex.tokens).toLocaleString() + " tokens" +
        (ex.tokens_per_s ? " · " + Math.round(ex.tokens_per_s).toLocaleString() + " tokens/s" : "") +
        (ex.eta_s ? " · ETA " + Math.round(ex.eta_s) + "s" : "") + (ex.merged ? " · merged" : "");
    }
    const stages = document.getElementById("stages");
    stages.replaceChildren();
    for (const name of Object.keys(st.stages).sort()) {
      const c = st.stages[name];
      const total = Object.values(c).reduce((a, b) => a + b, 0);
      const fin = (c.done || 0) + (c.skipped || 0) + (c.failed || 0);
      const row = el("div", {"class": "stage", "data-stage": name});
      row.append(el("span", {"class": "label"}, name));
      const bar = el("div", {"class": "bar"});
      const fill = el("div", {"class": "fill"});
      fill.style.width = (total ? (100 * fin / total) : 0) + "%";
      bar.append(fill);
      row.append(bar);
      let txt = fin + " / " + total;
      if (c.failed) txt += " · " + c.failed + " failed";
      if (c.running) txt += " · " + c.running + " running";
      row.append(el("span", {"class": "count"}, txt));
      stages.append(row);
    }
    document.getElementById("job-updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    const final = ["done", "failed", "stopped", "cancelled", "budget_exhausted"];
    if (!final.includes(st.status)) setTimeout(tick, 2000);
  }
  tick();
}

// Nearest latents in other dictionaries (on demand: the first semantic query loads the embedder).
function nearest(box) {
  const btn = document.getElementById("load-nearest");
  if (!btn) return;
  btn.addEventListener("click", async () => {
    btn.disabled = true;
    btn.textContent = "Searching…";
    let res;
    try {
      const r = await fetch(box.dataset.url);
      res = await r.json();
      if (!r.ok) throw new Error(res.detail || r.status);
    } catch (e) {
      box.replaceChildren(el("p", {"class": "empty"}, "No similar latents: " + e.message));
      return;
    }
    if (!res.hits.length) {
      box.replaceChildren(el("p", {"class": "empty"}, "No explained latent in another dictionary."));
      return;
    }
    const table = el("table", {"class": "data"});
    const body = el("tbody");
    for (const h of res.hits) {
      const tr = el("tr");
      tr.append(el("td", {"class": "num"}, h.similarity === null ? "" : h.similarity.toFixed(3)));
      const td = el("td");
      td.append(el("a", {"href": "/d/" + encodeURIComponent(h.dictionary_pk) + "/" + encodeURIComponent(h.latent)},
                   h.dictionary + " #" + h.latent));
      tr.append(td);
      tr.append(el("td", {"class": "expl"}, h.text));
      body.append(tr);
    }
    table.append(body);
    box.replaceChildren(table);
  });
}

// Keyed forms (start a comparison): POST JSON with the key typed into the form (kept for the session only).
function keyedForm(form) {
  const keyInput = form.querySelector("input[name=key]");
  if (keyInput && sessionStorage.getItem("autointerp-key")) keyInput.value = sessionStorage.getItem("autointerp-key");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    const key = data.key || "";
    delete data.key;
    if (key) sessionStorage.setItem("autointerp-key", key);
    const status = form.querySelector(".status");
    status.textContent = "Working…";
    try {
      const r = await fetch(form.dataset.url, {method: "POST", body: JSON.stringify(data),
        headers: {"Content-Type": "application/json", "X-API-Key": key}});
      const res = await r.json();
      if (!r.ok) throw new Error(res.detail || r.status);
      window.location.href = "/compare/" + encodeURIComponent(res.id);
    } catch (e) {
      status.textContent = String(e.message);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job && job.dataset.final !== "yes") watchJob(job);
  const nb = document.getElementById("nearest");
  if (nb) nearest(nb);
  document.querySelectorAll("form.keyed").forEach(keyedForm);
});
