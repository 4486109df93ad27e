"""Write README.md from nbs/index.ipynb.

nbdev-readme renders through Quarto, which is not installable on our machines, so the README is
the index notebook's cells joined in order (markdown as is, code in fences). Run by `make export`.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    nb = json.loads((ROOT/"nbs"/"index.ipynb").read_text())
    parts = []
    for c in nb["cells"]:
        src = "".join(c["source"]).strip()
        if not src or src.startswith("#| hide"): continue
        parts.append(src if c["cell_type"] == "markdown" else f"```python\n{src}\n```")
    note = "<!-- generated from nbs/index.ipynb by tools/readme.py; edit the notebook, not this file -->\n\n"
    (ROOT/"README.md").write_text(note + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
