"""Issue 15's figures for hostile inputs: memory of a small huge-canvas PNG, a trickling host, SIGTERM.

- `glr clean --workers 4` on four copies of a single-colour 13000×13000 PNG (0.5 MB each): peak RSS
  with the pixel budget (pipeline.images.MAX_PIXELS) and with it lifted (what decoding them costs);
- `glr fetch-urls --timeout 2 --retries 0` against a loopback host sending one body byte every 0.5 s:
  seconds until it gives up;
- the same with a 30 s timeout and 3 retries, SIGTERM after 2 s: seconds until the process is gone.

Run: .venv/bin/python benchmarks/hostile_inputs.py   (writes its section of benchmarks/RESULTS.md)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import write_section  # noqa: E402
from tests.test_images import flat_png  # noqa: E402

GLR = str(Path(sys.executable).with_name("glr"))

CLEAN = """
import resource, sys
import pipeline.images as images
if sys.argv[2] == "off":
    images.MAX_PIXELS = 10**12
from pipeline.acquire.clean import clean
res = clean(sys.argv[1], quarantine=sys.argv[1] + "-q", workers=4)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, res["reasons"])
"""


def clean_peak(folder: Path, budget: str) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CLEAN, str(folder), budget], capture_output=True, text=True,
                         env=env, check=True, timeout=600).stdout.split(" ", 1)
    return int(out[0]), eval(out[1])


def trickle_host():
    import socketserver

    from tests.acquire.test_urls import _TrickleHandler

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _TrickleHandler)
    server.daemon_threads = True
    server.stop, server.jpeg, server.huge = threading.Event(), b"\xff" * 1000, b""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def fetch_seconds(tmp: Path, host: str, args: list[str], term_after: float | None) -> float:
    tmp.mkdir()
    csv = tmp / "list.csv"
    csv.write_text("id,url\n" + "".join(f"abc{k:03d},{host}/body/{k}.jpg\n" for k in range(4)))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(ROOT), no_proxy="127.0.0.1")
    t0 = time.monotonic()
    proc = subprocess.Popen([GLR, "fetch-urls", str(csv), "--out", str(tmp / "o"), "--workers", "4", "-q", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if term_after is not None:
        time.sleep(term_after)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    return time.monotonic() - t0


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        imgs = tmp / "imgs"
        imgs.mkdir()
        png = flat_png(13000, 13000)
        for k in range(4):
            (imgs / f"flat{k}.png").write_bytes(png)
        on, reasons_on = clean_peak(imgs, "on")
        for p in (tmp / "imgs-q").rglob("*.png"):  # put them back for the run without a budget
            p.rename(imgs / p.name)
        (tmp / "imgs-q" / "report.csv").unlink()
        off, reasons_off = clean_peak(imgs, "off")
        server, host = trickle_host()
        give_up = fetch_seconds(tmp / "f1", host, ["--timeout", "2", "--retries", "0"], None)
        term = fetch_seconds(tmp / "f2", host, ["--timeout", "30", "--retries", "3"], 2.0)
        server.stop.set()
        server.shutdown()
    body = (
        "### Hostile inputs (issue 15, classes 3, 8 and 10)\n\n"
        "| case | figure |\n|---|---|\n"
        f"| `glr clean --workers 4`, 4 × single-colour 13000×13000 PNG ({len(png) / 1e6:.2f} MB each), "
        f"pixel budget on | peak RSS {on} MB; {reasons_on} |\n"
        f"| same, budget lifted (what decoding them costs) | peak RSS {off} MB; {reasons_off or 'all kept'} |\n"
        f"| `glr fetch-urls --timeout 2 --retries 0`, host sends a body byte every 0.5 s (4 URLs, 4 workers) | "
        f"gives up after {give_up:.2f} s (before: never) |\n"
        f"| `glr fetch-urls --timeout 30 --retries 3` on that host, SIGTERM after 2 s | gone {term:.2f} s later, "
        "exit 143, no `.glr-tmp` left |\n"
    )
    write_section("hostile-inputs", body, "python benchmarks/hostile_inputs.py")
    print(body)


if __name__ == "__main__":
    main()
