"""The dashboard over a busy app: jobs keep arriving, a worker runs them, some fail for good.

    pip install 'worq-core[dashboard]'
    python examples/dashboard/app.py                 # then open http://127.0.0.1:8765/
    python examples/dashboard/app.py --seconds 5     # stop by itself after 5 s

Everything lives in this one process on the in-memory broker: a producer thread, a worker
thread and the dashboard. Against Redis the same dashboard runs beside your workers with
``worq dashboard myapp:app`` or, with no app code at hand, ``worq dashboard --broker URL``.
With ``--screenshots DIR`` (and Playwright on Debian's chromium) it saves the pages there: the
pictures in the Monitoring docs are made this way.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.request

from worq_core import Worq, current_job
from worq_core.dashboard import DashboardConfig, running, serve

app = Worq()


@app.task(name="resize", max_retries=1)
def resize(image: str, width: int) -> str:
    time.sleep(random.uniform(0.01, 0.05))
    if image.endswith("7.png"):
        raise ValueError(f"{image}: not a PNG file")
    return f"{image}@{width}"


@app.task(name="report", queue="reports")
def report(month: str) -> int:
    job = current_job()
    for step in range(1, 11):
        time.sleep(0.1)
        job.progress(step, f"section {step} of 10", total=10)
    return len(month)


def produce(stop: threading.Event) -> None:
    n = 0
    while not stop.wait(0.05):
        n += 1
        resize.enqueue(f"photo-{n}.png", width=random.choice([320, 640, 1280]))
        if n % 10 == 0:
            report.enqueue(f"2026-{n % 12 + 1:02d}")
        if n % 25 == 0:
            resize.options(delay=3600).enqueue(f"later-{n}.png", width=320)


def screenshots(base: str, folder: str) -> None:
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        for name, path in (
            ("overview", "/"),
            ("jobs", "/jobs?state=dead"),
            ("workers", "/workers"),
        ):
            page.goto(base + path)
            page.wait_for_timeout(15000 if name == "overview" else 500)  # let the chart fill
            page.screenshot(path=f"{folder}/dashboard-{name}.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="worq dashboard example")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seconds", type=float, help="stop after this long")
    parser.add_argument("--screenshots", metavar="DIR", help="save pages there, then stop")
    options = parser.parse_args()

    stop = threading.Event()
    threading.Thread(target=produce, args=(stop,), daemon=True).start()
    worker = app.worker(concurrency=4, lease=3.0)  # a heartbeat each second
    threading.Thread(target=worker.run, daemon=True).start()
    config = DashboardConfig(refresh_seconds=1.0)
    if options.seconds is None and options.screenshots is None:
        print(f"dashboard: http://127.0.0.1:{options.port}/ (Ctrl+C to stop)")
        serve(app, "127.0.0.1", options.port, config)
    else:
        with running(app, config, port=options.port) as base:
            print("dashboard: running")
            if options.screenshots:
                time.sleep(3)
                screenshots(base, options.screenshots)
            else:
                time.sleep(options.seconds or 0)
            with urllib.request.urlopen(base + "/api/overview") as response:
                overview = json.load(response)
    stop.set()
    worker.stop()
    if options.seconds is not None or options.screenshots is not None:
        print(f"workers: {overview['workers']}")
        print(f"jobs finished: {'yes' if overview['processed'] > 0 else 'no'}")
        print(f"queues: {', '.join(q['queue'] for q in overview['queues'])}")


if __name__ == "__main__":
    main()
