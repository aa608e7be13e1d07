"""`make bench` / `make experiments`: run the benchmark (or experiment) scripts, then assemble ``bench/results.md``.

Each script writes its own ``bench/sections/NN-name.md`` (and a JSON beside it); this file only orders and joins
them, so one slow or failing script does not erase the others' last results.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Scripts run by `make bench`, in order, with their arguments.
SCRIPTS = [["perf.py"]]
#: Scripts run by `make experiments` (``--experiments``): the generative / latent-OT studies, minutes each.
EXPERIMENTS = [["domain_adaptation.py"], ["prior_matching.py"], ["taef2_style.py"], ["diffusion_demo.py"]]


def assemble() -> str:
    parts = ["# lorakit benchmark results", "",
             "Regenerate with `make bench` (each section names its own script). Figures are ratios measured side "
             "by side in one run.", ""]
    for section in sorted((HERE / "sections").glob("*.md")):
        parts.append(section.read_text().rstrip() + "\n")
    return "\n".join(parts)


def main() -> int:
    scripts = EXPERIMENTS if "--experiments" in sys.argv[1:] else SCRIPTS
    failed = []
    for script in scripts:
        t0 = time.perf_counter()
        print(f"== bench/{' '.join(script)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script[0]), *script[1:]]).returncode != 0:
            failed.append(script[0])
        print(f"== {script[0]} took {time.perf_counter() - t0:.0f}s", flush=True)
    (HERE / "results.md").write_text(assemble())
    print(f"wrote {HERE / 'results.md'}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
