// Drive the demo page in Debian's chromium through playwright-core (no browser download).
// usage: node demo.mjs URL IMAGE SCREENSHOT
import { chromium } from "playwright-core";

const [url, imagePath, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const external = [];
try {
  const page = await browser.newPage({ viewport: { width: 1300, height: 980 } });
  page.on("request", (req) => { if (!req.url().startsWith(url) && !req.url().startsWith("data:") && !req.url().startsWith("blob:")) external.push(req.url()); });
  await page.goto(url);
  await page.waitForSelector(".samples img");
  const done = () => page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Done")
    && [...document.querySelectorAll(".strip img")].every((i) => i.src.startsWith("data:image/png")), null, { timeout: 60000 });
  const state = () => page.evaluate(() => ({
    tokens: document.querySelector("#tokens").textContent,
    iterations: document.querySelector("#iterations").textContent,
    strip: document.querySelectorAll(".strip img").length,
    reconstruction: document.querySelector("#reconstruction").src.slice(0, 22),
    curl: document.querySelector("#curl").textContent,
    chosen: document.querySelectorAll(".strip figure.chosen").length,
    picker: !!document.querySelector("#model") && document.querySelector("#model").offsetParent !== null,
    compare: !!document.querySelector("#compareView") && document.querySelector("#compareView").offsetParent !== null,
    kinds: [...document.querySelectorAll("#kind option")].map((o) => o.value),
    title: document.querySelector("#stripTitle").textContent,
    unit: document.querySelector("#iterationsLabel").textContent,
    captions: [...document.querySelectorAll(".strip figcaption")].map((c) => c.textContent),
  }));

  await page.setInputFiles("#file", imagePath);       // upload (default target: max L1 0.10)
  await done();
  const first = await state();
  await page.screenshot({ path: screenshot, fullPage: true });

  await page.selectOption("#kind", "tokens");          // change the target: a 64-token budget
  await page.$eval("#level", (el) => { el.value = "64"; el.dispatchEvent(new Event("input")); el.dispatchEvent(new Event("change")); });
  await page.waitForFunction(() => document.querySelector("#tokens").textContent === "64", null, { timeout: 60000 });
  await done();
  const second = await state();

  await page.click(".samples img[data-name='noise.png']");  // a sample
  await page.waitForFunction(() => document.querySelector("#curl").textContent.includes("noise.png"), null, { timeout: 60000 });
  await done();
  const third = await state();
  console.log(JSON.stringify({ first, second, third, external }));
} finally {
  await browser.close();
}
