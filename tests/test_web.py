"""The web pages end to end in headless Chromium (Debian chromium + chromium-driver, driven by selenium): the
feature page's highlighted tokens (with a screenshot whose pixels are checked), hover values, XSS payloads from
the corpus and from explanations rendered inert, the dictionary table's sorting and filters, search, compare and
live job progress."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from api_support import API_KEY, XSS, api_env, api_server, http  # noqa: F401 (fixtures)
from needs import need

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go: $AUTOINTERP_SCREENSHOTS when set (to keep them), else this run's temporary folder."""
    keep = os.environ.get("AUTOINTERP_SCREENSHOTS")
    path = Path(keep) if keep else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shot(drv, path: Path) -> bytes:
    """Write the window's screenshot to `path`; it is a PNG of the window's size showing more than a blank page."""
    import io

    import numpy as np
    from PIL import Image

    drv.get_screenshot_as_file(str(path))
    png = path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000, path
    img = Image.open(io.BytesIO(png))
    size = drv.execute_script("return [window.innerWidth, window.innerHeight]")
    assert list(img.size) == size, (img.size, size)
    colours = np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 16, f"{path}: a nearly blank page ({len(colours)} colours)"
    return png


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    need(found is not None, "headless Chromium (apt-get install chromium chromium-driver; scripts/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1600",
              "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(found[1]), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _no_xss(drv) -> None:
    assert drv.execute_script("return window.__xss === undefined"), "a payload ran"
    from selenium.common.exceptions import NoAlertPresentException

    try:
        drv.switch_to.alert
        raise AssertionError("an alert opened")
    except NoAlertPresentException:
        pass


def _orange_pixels(png: bytes) -> int:
    """Pixels of the token highlight colour (amber, rgb ~ (247, 127, 0) blended over white at 12-90 %)."""
    import io

    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 200) & (g > 120) & (g < 235) & (b < 200) & (r - b > 60)).sum())


def test_feature_page_highlights_tokens_and_hover_shows_values(browser, api_server, api_env, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    i = api_env["explained"][2]
    browser.get(f"{api_server.url}/d/{api_env['dictionary']['id']}/{i}")
    assert f"Latent {i}" in browser.find_element(By.TAG_NAME, "h1").text
    top = browser.find_element(By.ID, "top-examples")
    ctxs = top.find_elements(By.CSS_SELECTOR, ".ctx")
    assert ctxs
    on = top.find_elements(By.CSS_SELECTOR, ".tok.on")
    assert on, "no highlighted token"
    # every highlighted token carries its value, and the strongest one is the most opaque
    vals = [float(t.get_attribute("data-act")) for t in on]
    assert all(v > 0 for v in vals)
    alphas = [float(t.value_of_css_property("background-color").rstrip(")").split(",")[-1]) for t in on]
    assert alphas[vals.index(max(vals))] == pytest.approx(max(alphas))
    # hover: the value appears (title and the CSS tooltip of data-act)
    strongest = on[vals.index(max(vals))]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", strongest)
    ActionChains(browser).move_to_element(strongest).perform()
    tip = browser.execute_script("return getComputedStyle(arguments[0], '::after').content", strongest)
    assert tip.strip('"') == strongest.get_attribute("data-act") == strongest.get_attribute("title")
    # the screenshot really shows highlighted tokens
    browser.execute_script("window.scrollTo(0, 0)")
    assert _orange_pixels(_shot(browser, shots / "feature_page.png")) > 200
    top.screenshot(str(shots / "feature_contexts.png"))
    box = (shots / "feature_contexts.png").read_bytes()
    assert box.startswith(PNG_MAGIC)
    assert _orange_pixels(box) > 200, "no highlight colour in the rendered contexts"
    # explanations with their score table, the histogram
    table = browser.find_element(By.CSS_SELECTOR, "table.expls")
    heads = [h.text.lower() for h in table.find_elements(By.TAG_NAME, "th")]
    assert "detection" in heads and "fuzzing" in heads
    assert browser.find_elements(By.CSS_SELECTOR, "svg.hist rect")
    _no_xss(browser)


def test_xss_payloads_from_corpus_and_explanations_are_inert(browser, api_server, api_env):
    from selenium.webdriver.common.by import By

    pk = api_env["dictionary"]["id"]
    hostile = api_env["explained"][0]  # its explanation is an XSS payload; the corpus holds all of them
    pages = [f"/d/{pk}/{hostile}", f"/d/{pk}", f"/d/{pk}?explained=yes&sort=score&order=desc",
             "/search?q=script&mode=keyword", "/search?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E&mode=keyword", "/"]
    # latents whose top contexts hold a whole payload from the corpus (the fixture asserts some exist)
    payloads = api_env["payload_latents"]
    assert payloads
    pages += [f"/d/{pk}/{i}" for i in payloads]
    for p in pages:
        browser.get(api_server.url + p)
        _no_xss(browser)
        assert not browser.find_elements(By.CSS_SELECTOR, "script:not([src]), img[src='x'], svg[onload], [onerror]")
    browser.get(f"{api_server.url}/d/{pk}/{hostile}")
    assert XSS[0] in browser.find_element(By.CSS_SELECTOR, "p.headline").text  # shown as text
    _no_xss(browser)
    # each payload of the corpus is shown character for character, as text, in its latent's contexts
    for i, payload in payloads.items():
        browser.get(f"{api_server.url}/d/{pk}/{i}")
        shown = browser.execute_script("return Array.from(document.querySelectorAll('#top-examples .ctx'))"
                                       ".map(c => c.textContent).join('\\n')")
        assert payload in shown, (i, payload, shown[:500])
        _no_xss(browser)


def test_dictionary_overview_sorts_and_filters(browser, api_server, api_env, shots):
    from selenium.webdriver.common.by import By

    pk = api_env["dictionary"]["id"]
    browser.get(f"{api_server.url}/d/{pk}")
    assert browser.find_elements(By.CSS_SELECTOR, "table.scores svg.spark rect")
    img = browser.find_element(By.CSS_SELECTOR, "img.plot")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
    # click the frequency header: rows sorted by frequency, descending
    browser.find_element(By.CSS_SELECTOR, "#latents th a.sort[href*='sort=frequency']").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda drv: "sort=frequency" in drv.current_url)
    freqs = [r.find_elements(By.TAG_NAME, "td")[1].text for r in browser.find_elements(By.CSS_SELECTOR,
                                                                                       "#latents tbody tr")]
    nums = [float(f.rstrip("%")) for f in freqs]
    assert nums == sorted(nums, reverse=True) and len(nums) == 50
    # next page continues below the last value
    browser.find_element(By.CSS_SELECTOR, "a[rel=next]").click()
    WebDriverWait(browser, 30).until(lambda drv: "cursor=" in drv.current_url)
    more = [float(r.find_elements(By.TAG_NAME, "td")[1].text.rstrip("%"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")]
    assert more and max(more) <= min(nums)
    # filter: explained only, by detection score
    browser.get(f"{api_server.url}/d/{pk}")
    form = browser.find_element(By.CSS_SELECTOR, "form.filters")
    form.find_element(By.CSS_SELECTOR, "select[name=explained] option[value=yes]").click()
    form.find_element(By.CSS_SELECTOR, "select[name=scorer] option[value=detection]").click()
    form.find_element(By.NAME, "min_score").send_keys("0.7")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda drv: "min_score=0.7" in drv.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert rows and len(rows) < len(api_env["explained"])
    for r in rows:
        assert float(r.find_elements(By.TAG_NAME, "td")[3].text) >= 0.7
    _shot(browser, shots / "dictionary_page.png")
    _no_xss(browser)


def test_search_page(browser, api_server, api_env, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{api_server.url}/search")
    box = browser.find_element(By.CSS_SELECTOR, "form.searchform input[name=q]")
    box.send_keys("brackets in python code" + Keys.ENTER)
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 60).until(lambda drv: "q=brackets" in drv.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
    assert rows and "brackets" in rows[0].text
    rows[0].find_element(By.TAG_NAME, "a").click()
    WebDriverWait(browser, 30).until(lambda drv: "/d/" in drv.current_url)
    assert "Latent" in browser.find_element(By.TAG_NAME, "h1").text
    _shot(browser, shots / "search_page.png")
    _no_xss(browser)


def test_compare_page_shows_pairs_side_by_side(browser, api_server, api_env, shots):
    from selenium.webdriver.common.by import By

    from autointerp.store.queries import T_CMP
    from autointerp.store.tables import utcnow

    store, a, b = api_env["store"], api_env["dictionary"], api_env["dictionary2"]
    ea, eb = api_env["explained"][1], [e["latent"] for e in store.explanations(b["id"]) if e["text"].startswith("commas")][0]
    with store.tx(write=True) as conn:
        cid = conn.execute(T_CMP.insert().values(
            dictionary_a=a["id"], dictionary_b=b["id"], method="embedding", params={}, created=utcnow(),
            summary={"matched_share": 0.5, "mean_similarity": 0.61},
            result={"pairs": [[ea, eb, 0.83], [api_env["explained"][2], eb + 1, 0.41]]})).inserted_primary_key[0]
    browser.get(f"{api_server.url}/compare")
    assert browser.find_element(By.CSS_SELECTOR, f"#comparisons a[href='/compare/{cid}']")
    browser.get(f"{api_server.url}/compare/{cid}")
    rows = browser.find_elements(By.CSS_SELECTOR, "#pairs tbody tr")
    assert len(rows) == 2 and rows[0].find_element(By.CSS_SELECTOR, "td.num").text == "0.830"
    assert "closing brackets" in rows[0].text and "commas and brackets" in rows[0].text
    assert browser.find_elements(By.CSS_SELECTOR, "svg.hist rect")
    _shot(browser, shots / "compare_page.png")


def test_job_page_shows_live_progress(browser, api_server, api_env, shots):
    """A job submitted through the API (not started), its page opened, then resumed through the API: the page's
    status goes pending → running → done and its bars fill, all without a reload (the page's own polling)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from llm_server_fixture import start_llm_server

    cache = api_env["cache"]
    latents = [int(i) for i in cache.alive_latents()[40:44]]
    key = {"X-API-Key": API_KEY}
    with start_llm_server(judge="judges:rule_judge", models=["judge"], latency_ms=600) as srv:
        spec = {"dictionary": "xss-mlp2", "latents": latents, "explainer_model": f"openai:judge@{srv.base_url}",
                "scorers": ["detection"], "hard_negatives": False,
                "sampling": {"n_explain": 5, "n_test": 10, "n_negatives": 10, "n_explain_negatives": 0,
                             "min_explain": 3, "min_test": 4, "min_negatives": 4},
                "llm": {"api_key_env": None, "response_cache": False, "max_retries": 1, "backoff_base_s": 0.01},
                "concurrency": 1}
        status, _, sub = http("POST", api_server.url + "/api/v1/jobs?run=false", spec, key)
        assert status == 201 and not sub["running_here"], sub
        job = sub["job_id"]
        browser.get(f"{api_server.url}/jobs/{job}")
        assert browser.find_element(By.ID, "job-status").text == "pending"
        assert browser.find_element(By.ID, "job-latents").text == "0 / 4"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#stages .stage")) == 2
        browser.execute_script("window.__same_page = 1")  # gone if the page reloads
        status, _, res = http("POST", f"{api_server.url}/api/v1/jobs/{job}/resume", None, key)
        assert status == 200 and res["running_here"]
        seen: list[tuple[str, str]] = []  # (status, latents finished) as the page showed them, in order

        def finished(drv):
            now = (drv.find_element(By.ID, "job-status").text, drv.find_element(By.ID, "job-latents").text)
            if not seen or seen[-1] != now:
                seen.append(now)
            return now[0] == "done"

        WebDriverWait(browser, 120, poll_frequency=0.1).until(finished)
        assert browser.execute_script("return window.__same_page") == 1, "the page reloaded instead of updating"
    states = [s for s, _ in seen]
    assert states[0] == "pending" and "running" in states and states[-1] == "done", seen
    assert states == sorted(states, key=["pending", "running", "done"].index), seen  # never back
    done = [int(x.split("/")[0]) for _, x in seen]
    assert done == sorted(done) and done[-1] == 4, seen
    assert browser.find_element(By.ID, "job-latents").text == "4 / 4"
    fills = [f.get_attribute("style") for f in browser.find_elements(By.CSS_SELECTOR, "#stages .fill")]
    assert len(fills) == 2 and all("width: 100%" in f for f in fills), fills
    assert browser.find_element(By.ID, "job-updated").text.startswith("Updated ")
    _shot(browser, shots / "job_page.png")
    browser.get(f"{api_server.url}/jobs")
    assert browser.find_element(By.CSS_SELECTOR, f"#jobs a[href='/jobs/{job}']")
    time.sleep(0.1)


def test_diff_page_highlights_both_sides(browser, api_server, api_env, subject, shots):
    """A stored diff's page: one row per latent, both sides' documents with tokens coloured where the latent fires
    (hover shows the value), the corpus's XSS payloads inert."""
    from selenium.webdriver.common.by import By

    from autointerp.corpus_latents import LatentReader, Side, run_diff
    from autointerp.dictionaries import load_cached_dictionary

    cache = api_env["cache"]
    reader = LatentReader(subject, load_cached_dictionary(cache.manifest["dictionary"]), "mlp_neurons.2",
                          "builtin:smollm2", "xss-mlp2")
    a = [f"def f{i}(x):\n    return x[{i}] + 1  {XSS[i % len(XSS)]}" for i in range(8)]
    b = [f"The river rose {i} feet after the storm. {XSS[(i + 1) % len(XSS)]}" for i in range(8)]
    r = run_diff(reader, Side("code", texts=a), Side("prose", texts=b), store=api_env["store"],
                 dictionary_pk=api_env["dictionary"]["id"], top=5, max_tokens=48, progress=False)
    browser.get(f"{api_server.url}/analyses")
    assert browser.find_element(By.CSS_SELECTOR, f"#analyses a[href='/analyses/{r['id']}']")
    browser.get(f"{api_server.url}/analyses/{r['id']}")
    _no_xss(browser)
    rows = browser.find_elements(By.CSS_SELECTOR, "#diff-rows tr.diff-row")
    assert len(rows) == len(r["rows"]) == 5
    first = browser.find_elements(By.CSS_SELECTOR, "#diff-rows tr.diff-examples")[0]
    sides = first.find_elements(By.CSS_SELECTOR, ".side")
    assert len(sides) == 2
    top = r["rows"][0]
    for side, exs in zip(sides, (top["examples_a"], top["examples_b"])):
        ctxs = side.find_elements(By.CSS_SELECTOR, ".ctx")
        assert len(ctxs) == len(exs)
        for ctx, e in zip(ctxs, exs):  # the coloured tokens are exactly the ones where the latent fired
            on = [float(t.get_attribute("data-act")) for t in ctx.find_elements(By.CSS_SELECTOR, "span.tok.on")]
            assert on == pytest.approx([a for a in e["acts"] if a > 0], abs=1e-3)
    assert _orange_pixels(_shot(browser, shots / "diff_page.png")) > 100


def test_separability_page_shows_each_latents_two_histograms(browser, api_server, api_env, subject, shots):
    """A stored separability run: its latents by JS distance, each with the concept's and the others' histogram
    bars (one bar per nonzero bin of the stored statistic), linked from the latent's page."""
    from selenium.webdriver.common.by import By

    from autointerp.corpus_latents import LatentReader, run_separability
    from autointerp.dictionaries import load_cached_dictionary
    from autointerp.store.analyses import latent_stats

    cache, store, d = api_env["cache"], api_env["store"], api_env["dictionary"]
    reader = LatentReader(subject, load_cached_dictionary(cache.manifest["dictionary"]), "mlp_neurons.2",
                          "builtin:smollm2", "xss-mlp2")
    texts = [f"def f{i}(x):\n    return [x, {i}]" for i in range(10)] + \
        [f"The river rose {i} feet after the storm. {XSS[i % len(XSS)]}" for i in range(10)]
    r = run_separability(reader, texts, ["code"] * 10 + ["prose"] * 10, "code", store=store, dictionary_pk=d["id"],
                         top=6, max_tokens=32, progress=False)
    browser.get(f"{api_server.url}/analyses/{r['id']}")
    _no_xss(browser)
    rows = browser.find_elements(By.CSS_SELECTOR, "#sep-rows tbody tr")
    assert len(rows) == len(r["rows"]) == 6
    stats = {s["latent"]: s for s in latent_stats(store, d["id"], [x["latent"] for x in r["rows"]], "separability")
             if s["analysis_id"] == r["id"]}
    for row, want in zip(rows, r["rows"]):
        assert row.find_element(By.CSS_SELECTOR, "td.num").text == f"{want['separability']:.3f}"
        det = stats[want["latent"]]["details"]
        assert len(row.find_elements(By.CSS_SELECTOR, "rect.concept")) == len(det["concept"])
        assert len(row.find_elements(By.CSS_SELECTOR, "rect.other")) == len(det["other"])
    _shot(browser, shots / "separability_page.png")
    browser.get(f"{api_server.url}/d/{d['id']}/{r['rows'][0]['latent']}")
    assert browser.find_element(By.CSS_SELECTOR, "dd.latent-stat[data-stat='separability'] a").get_attribute(
        "href").endswith(f"/analyses/{r['id']}")


def test_meta_page_lists_each_meta_latents_base_latents(browser, api_server, api_env, shots):
    """A meta-dictionary's analysis page: one card per meta-latent that fires, its base latents as links to their
    pages (in the stored order) with their explanations as they are now."""
    from selenium.webdriver.common.by import By

    from autointerp.meta import save_meta_analysis

    store, d, explained = api_env["store"], api_env["dictionary"], api_env["explained"]
    every = [[(explained[1], 0.9), (explained[2], 0.5)], [], [(explained[3], 0.7)]]
    aid = save_meta_analysis(store, d["id"], "runs/meta-x", {"k": 2, "n_latents": 3}, every)
    browser.get(f"{api_server.url}/analyses/{aid}")
    _no_xss(browser)
    cards = browser.find_elements(By.CSS_SELECTOR, "#meta-rows .meta-latent")
    assert [c.get_attribute("data-meta") for c in cards] == ["0", "2"]
    links = [a.get_attribute("href").rsplit("/", 1)[1] for a in cards[0].find_elements(By.CSS_SELECTOR, "tr.member a")]
    assert links == [str(explained[1]), str(explained[2])]
    assert "closing brackets" in cards[0].text  # explained[1]'s explanation (api_support.populate)
    _shot(browser, shots / "meta_page.png")
    # registered as a dictionary of its own: the card links to the meta-latent's page, which lists the same base
    # latents (no token examples) and follows a link back to a base latent's page
    from autointerp.meta import register_meta_dictionary

    md = register_meta_dictionary(store, d, "runs/meta-x", {"k": 2, "base": {"d": 8}}, every, aid, d["n_latents"])
    browser.get(f"{api_server.url}/analyses/{aid}")
    browser.find_element(By.CSS_SELECTOR, "#meta-rows .meta-latent[data-meta='0'] h3 a").click()
    assert browser.current_url.endswith(f"/d/{md['id']}/0")
    _no_xss(browser)
    rows = browser.find_elements(By.CSS_SELECTOR, "#meta-members tr.member")
    assert [r.find_element(By.TAG_NAME, "a").get_attribute("href").rsplit("/", 1)[1] for r in rows] == [
        str(explained[1]), str(explained[2])]
    assert "closing brackets" in rows[0].text and not browser.find_elements(By.ID, "top-examples")
    assert f"(2 of {d['n_latents']} base latents)" in browser.find_element(By.CSS_SELECTOR, "section.stats").text
    _shot(browser, shots / "meta_latent_page.png")
    rows[0].find_element(By.TAG_NAME, "a").click()
    assert browser.current_url.endswith(f"/d/{d['id']}/{explained[1]}")
