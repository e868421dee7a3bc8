"""Screenshot of the playground (docs/playground.png, shown in the README) against a running
`vas-server serve` (default args: the embedded SmolLM2 and the demo heads): the README's prompt,
the `positive` head at weight 4, plain and steered side by side, the per-token view of a lifted
token open. Needs Debian's chromium and chromium-driver and selenium (the dev extra).

    python scripts/playground_screenshot.py [--url http://localhost:8000] [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1250", "--hide-scrollbars"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8000")
    parser.add_argument("--head", default="positive")
    parser.add_argument("--weight", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=Path("docs/playground.png"))
    args = parser.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    with tempfile.TemporaryDirectory() as profile:
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            wait = WebDriverWait(driver, 300)
            driver.get(args.url + "/playground")
            slider = wait.until(lambda d: d.find_element(By.ID, f"weight-{args.head}"))
            slider.send_keys(Keys.HOME)  # -10, then up in steps of 0.5
            for _ in range(int((args.weight + 10) / 0.5)):
                slider.send_keys(Keys.ARROW_RIGHT)
            button = driver.find_element(By.ID, "compare")
            button.click()
            wait.until(lambda d: button.is_enabled())
            lifted = driver.find_elements(By.CSS_SELECTOR, "#steered-out .tok.lifted")
            (lifted or driver.find_elements(By.CSS_SELECTOR, "#steered-out .tok"))[0].click()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
