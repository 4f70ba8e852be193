// Drive the demo page against a server with several models, in Debian's chromium through playwright-core:
// the model picker, one model streamed (KARL), the compare view, and API errors shown as their messages.
// usage: node compare.mjs URL IMAGE SCREENSHOT   (prints one JSON line of what the page showed)
import { chromium } from "playwright-core";

const [url, imagePath, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const external = [];
const TIMEOUT = { timeout: 60000 };

async function open() {
  const page = await browser.newPage({ viewport: { width: 1300, height: 980 } });
  page.on("request", (req) => { if (!req.url().startsWith(url) && !req.url().startsWith("data:") && !req.url().startsWith("blob:")) external.push(req.url()); });
  return page;
}
const kinds = (page) => page.evaluate(() => [...document.querySelectorAll("#kind option")].map((o) => o.value));
// Compare finished: the status says so and every model's card holds a reconstruction or an error message.
const compared = (page) => page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Done")
  && [...document.querySelectorAll(".card[data-model]")].every((c) => c.querySelector(".rec").src.startsWith("data:image/png")
    || c.querySelector(".error").textContent.trim() !== ""), null, TIMEOUT);
const cards = (page) => page.evaluate(() => ({
  target: target(),  // the page's own target(), as it sent it
  status: document.querySelector("#status").textContent,
  statusError: document.querySelector("#status").className === "error",
  visible: document.querySelector("#compareView").offsetParent !== null && document.querySelector("#singleView").offsetParent === null,
  pickerDisabled: document.querySelector("#model").disabled,
  curl: document.querySelector("#curl").textContent,
  cards: [...document.querySelectorAll(".card[data-model]")].map((c) => ({
    model: c.dataset.model,
    tokens: c.querySelector(".c-tokens").textContent,
    iterations: c.querySelector(".c-iterations").textContent,
    unit: c.querySelector(".c-iterations").nextElementSibling.textContent,
    met: c.querySelector(".c-met").textContent,
    l1: c.querySelector(".c-l1").textContent,
    reconstruction: c.querySelector(".rec").src.slice(0, 22),
    error: c.querySelector(".error").textContent,
  })),
}));
async function setLevel(page, value) {
  await page.$eval("#level", (el, v) => { el.value = String(v); el.dispatchEvent(new Event("input")); el.dispatchEvent(new Event("change")); }, value);
}

try {
  const page = await open();
  await page.goto(url);
  await page.waitForSelector("#model option", { state: "attached" });
  await page.waitForSelector(".samples img");
  const picker = await page.evaluate(() => ({
    visible: document.querySelector("#model").offsetParent !== null,
    options: [...document.querySelectorAll("#model option")].map((o) => o.value),
    labels: [...document.querySelectorAll("#model option")].map((o) => o.textContent),
    selected: document.querySelector("#model").value,
    info: document.querySelector("#modelInfo").textContent,
  }));
  const offered = { [picker.selected]: await kinds(page) };

  await page.selectOption("#model", "karl");               // one model, streamed: KARL's passes
  offered.karl = await kinds(page);
  await page.setInputFiles("#file", imagePath);
  await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Done")
    && [...document.querySelectorAll(".strip img")].every((i) => i.src.startsWith("data:image/png")), null, TIMEOUT);
  const karl = await page.evaluate(() => ({
    target: target(),
    tokens: document.querySelector("#tokens").textContent,
    iterations: document.querySelector("#iterations").textContent,
    unit: document.querySelector("#iterationsLabel").textContent,
    strip: document.querySelectorAll(".strip img").length,
    chosen: document.querySelectorAll(".strip figure.chosen").length,
    reconstruction: document.querySelector("#reconstruction").src.slice(0, 22),
    curl: document.querySelector("#curl").textContent,
  }));

  await page.check("#compare");                             // every model side by side, default target
  await compared(page);
  offered.compare = await kinds(page);
  const first = await cards(page);
  await page.screenshot({ path: screenshot, fullPage: true });

  await page.selectOption("#kind", "max_tokens");          // a token cap every model takes
  await setLevel(page, 64);
  await page.waitForFunction(() => document.querySelector("#curl").textContent.includes("max_tokens=64"), null, TIMEOUT);
  await compared(page);
  const second = await cards(page);

  // A target only one model takes (slipped past the picker): that card shows the API's 422, the other its result.
  await page.$eval("#kind", (k) => { k.append(new Option("min PSNR", "min_psnr")); k.value = "min_psnr"; k.dispatchEvent(new Event("change")); });
  await page.waitForFunction(() => document.querySelector("#curl").textContent.includes("min_psnr="), null, TIMEOUT);
  await compared(page);
  const mixed = await cards(page);

  // A stale model list naming a model the server does not serve: the 404's message, alone and in compare.
  const stale = await open();
  await stale.route("**/v1/models", async (route) => {
    const resp = await route.fetch();
    const json = await resp.json();
    json.data.push({ ...json.data[0], id: "ghost", default: false });
    await route.fulfill({ response: resp, json });
  });
  await stale.goto(url);
  await stale.waitForSelector("#model option[value='ghost']", { state: "attached" });
  await stale.selectOption("#model", "ghost");
  await stale.setInputFiles("#file", imagePath);
  await stale.waitForFunction(() => document.querySelector("#status").className === "error", null, TIMEOUT);
  const missing = await stale.evaluate(() => document.querySelector("#status").textContent);
  await stale.check("#compare");
  await compared(stale);
  const ghost = await cards(stale);

  console.log(JSON.stringify({ picker, offered, karl, first, second, mixed, missing, ghost, external }));
} finally {
  await browser.close();
}
