"""`python -m autointerp.api` rewrites autointerp/api/openapi.json from the app (the committed contract);
`--check` exits 1 when the file differs from the app's schema."""

from __future__ import annotations

import json
import os
import sys
import tempfile

from .app import HERE

OPENAPI = HERE / "openapi.json"


def render() -> str:
    from .app import Settings, create_app

    # the schema does not depend on the data: build the app on a throwaway store
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("AUTOINTERP_DATABASE_URL", f"sqlite:///{tmp}/schema.db")
        app = create_app(Settings(embedded_runner=False))
        return json.dumps(app.openapi(), indent=1, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = OPENAPI.is_file() and OPENAPI.read_text() == text
        print("openapi.json is current" if same else f"{OPENAPI} differs from the app: run python -m autointerp.api")
        return 0 if same else 1
    OPENAPI.write_text(text)
    print(f"wrote {OPENAPI}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
