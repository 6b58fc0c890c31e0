#!/usr/bin/env node
/**
 * The dashboard in a real browser: Debian's Chromium driven by playwright-core (never a
 * downloaded browser).
 *
 * Functional checks, against a running hub (`sow serve-api` serving the static export at /market):
 *   node e2e/market.e2e.mjs --url http://127.0.0.1:8080 --symbol BTCUSDT --rows 15
 * rows appear, prices change and flash, search filters, the market filter and sorting work,
 * favourites stay pinned across a reload, the phone layout fits, and the detail page draws the
 * candles from /api/prices/{symbol}/{market}/ohlc and shows the live price.
 *
 * Performance (--perf): 1,000 symbols × 2 markets at 1,000 quote updates/s from the in-process
 * mock hub (e2e/mock-api.mjs, the /ws protocol of serve-api, over a real loopback WebSocket);
 * frame times from requestAnimationFrame and the store's batch timings. Reported, not asserted.
 *
 * Screenshots and results go to --artifacts (default ../test-artifacts). Exit code 0 = all passed.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

import { startMockHub } from "./mock-api.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    symbol: { type: "string" },
    market: { type: "string", default: "FUTURES" },
    search: { type: "string" },
    rows: { type: "string", default: "1" },
    "min-candles": { type: "string", default: "1" },
    artifacts: { type: "string", default: path.resolve(HERE, "../../test-artifacts") },
    chromium: { type: "string", default: process.env.CHROMIUM_PATH || "/usr/bin/chromium" },
    perf: { type: "boolean", default: false },
    "perf-symbols": { type: "string", default: "1000" },
    "perf-rate": { type: "string", default: "1000" },
    "perf-seconds": { type: "string", default: "5" },
    timeout: { type: "string", default: "30" },
  },
});

const TIMEOUT_MS = Number(opts.timeout) * 1000;
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  // keep rAF and timers at full speed even though no window is ever "visible"
  "--disable-background-timer-throttling",
  "--disable-renderer-backgrounding",
  "--disable-backgrounding-occluded-windows",
];

fs.mkdirSync(opts.artifacts, { recursive: true });
const results = { checks: [], perf: null, screenshots: [] };
let failed = 0;

function log(line) {
  process.stdout.write(`${line}\n`);
}

async function launch() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "sow-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.chromium,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1280, height: 800 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  page.on("pageerror", (err) => problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console error: ${msg.text()}`);
  });
  page.setDefaultTimeout(TIMEOUT_MS);
  return {
    page,
    problems,
    close: async () => {
      await context.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

async function screenshot(page, name) {
  const file = path.join(opts.artifacts, name);
  await page.screenshot({ path: file });
  results.screenshots.push(file);
  log(`  screenshot ${file}`);
}

async function check(name, page, fn) {
  const started = Date.now();
  try {
    const detail = await fn();
    results.checks.push({ name, ok: true, ms: Date.now() - started, detail: detail ?? null });
    log(`ok - ${name}${detail ? ` (${detail})` : ""}`);
  } catch (err) {
    failed += 1;
    const message = err instanceof Error ? err.message.split("\n")[0] : String(err);
    results.checks.push({ name, ok: false, ms: Date.now() - started, error: message });
    log(`not ok - ${name}: ${message}`);
    const safe = name.replace(/[^a-z0-9]+/gi, "-").toLowerCase();
    await page.screenshot({ path: path.join(opts.artifacts, `failed-${safe}.png`) }).catch(() => {});
  }
}

/** Polls `probe` (run in the page) until it returns a truthy value. */
async function until(page, probe, arg, what, timeoutMs = TIMEOUT_MS) {
  try {
    const handle = await page.waitForFunction(probe, arg, { timeout: timeoutMs, polling: 100 });
    return await handle.jsonValue();
  } catch {
    throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}`);
  }
}

/** The rows in the DOM, top to bottom: symbol and the texts of both price cells. */
function visibleRows(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll("[data-testid=market-table] [role=row][data-symbol]")]
      .map((row) => ({
        y: new DOMMatrixReadOnly(getComputedStyle(row).transform).m42,
        symbol: row.getAttribute("data-symbol"),
        spot: row.querySelector("[data-testid=spot-price]")?.textContent ?? "",
        futures: row.querySelector("[data-testid=futures-price]")?.textContent ?? "",
      }))
      .sort((a, b) => a.y - b.y),
  );
}

const tableRows = (page) => page.getAttribute("[data-testid=market-table]", "data-rows").then(Number);
const price = (text) => (/^[\d,.]+$/.test(text) ? Number(text.replaceAll(",", "")) : null);

// --- functional checks against a real hub ---------------------------------------------------

async function functional(base) {
  const expectedRows = Number(opts.rows);
  const { page, problems, close } = await launch();
  const marketUrl = `${base.replace(/\/+$/, "")}/market/`;
  try {
    await check("the dashboard loads from the hub at /market", page, async () => {
      const resp = await page.goto(marketUrl);
      if (!resp || resp.status() !== 200) throw new Error(`HTTP ${resp?.status()} for ${marketUrl}`);
      await page.waitForSelector("[data-testid=market-table]");
      return marketUrl;
    });

    await check("the connection indicator turns live", page, async () => {
      await page.waitForSelector("[data-testid=connection][data-status=open]");
      return await page.textContent("[data-testid=connection]");
    });

    await check(`rows appear for every symbol (${expectedRows})`, page, async () => {
      await until(page, (n) => Number(document.querySelector("[data-testid=market-table]")?.getAttribute("data-rows")) >= n, expectedRows, `${expectedRows} rows`);
      const rows = await visibleRows(page);
      const priced = rows.filter((r) => price(r.spot) !== null || price(r.futures) !== null);
      if (!priced.length) throw new Error("no row shows a price");
      return `${await tableRows(page)} rows, first ${rows[0]?.symbol} spot ${rows[0]?.spot} futures ${rows[0]?.futures}`;
    });

    await check("prices change, and the change flashes", page, async () => {
      const before = new Map((await visibleRows(page)).map((r) => [r.symbol, `${r.spot}|${r.futures}`]));
      const started = Date.now();
      let changed = [];
      while (Date.now() - started < TIMEOUT_MS && changed.length === 0) {
        await page.waitForTimeout(250);
        changed = (await visibleRows(page)).filter((r) => before.has(r.symbol) && before.get(r.symbol) !== `${r.spot}|${r.futures}`);
      }
      if (!changed.length) throw new Error("no price changed");
      const flashing = await until(
        page,
        () => document.getAnimations().filter((a) => String(a.animationName ?? "").includes("flash")).length,
        undefined,
        "a flash animation",
      );
      return `${changed.length} rows changed within ${Date.now() - started} ms; ${flashing} flash animations running`;
    });

    await check("the age column counts seconds since the last update", page, async () => {
      const ages = await page.$$eval("[data-testid=market-table] [role=row][data-symbol] [role=cell]:last-child", (cells) => cells.map((c) => c.textContent));
      if (!ages.length || !ages.every((a) => /^\d+[smhd]$/.test(a ?? ""))) throw new Error(`ages: ${ages.slice(0, 5).join(", ")}`);
      return ages.slice(0, 3).join(", ");
    });

    const symbol = opts.symbol ?? (await visibleRows(page))[0]?.symbol;
    const term = (opts.search ?? symbol?.slice(0, 3) ?? "BTC").toLowerCase();
    await check(`the search box filters by symbol substring ("${term}")`, page, async () => {
      const total = await tableRows(page);
      await page.fill("[data-testid=search]", term);
      await until(page, (t) => {
        const rows = [...document.querySelectorAll("[data-testid=market-table] [role=row][data-symbol]")];
        return rows.length > 0 && rows.every((r) => r.getAttribute("data-symbol").includes(t.toUpperCase()));
      }, term, "only matching rows");
      const shown = await tableRows(page);
      if (shown >= total && total > 1) throw new Error(`the search hid nothing (${shown} of ${total})`);
      await page.fill("[data-testid=search]", "no-such-symbol-zz");
      await page.waitForSelector("[data-testid=empty]");
      await page.fill("[data-testid=search]", "");
      await until(page, (n) => Number(document.querySelector("[data-testid=market-table]")?.getAttribute("data-rows")) === n, total, "all rows back");
      return `${shown} of ${total} rows match`;
    });

    await check("the market filter shows only symbols quoted on that market", page, async () => {
      await page.click("button[data-market=SPOT]");
      await until(page, () => [...document.querySelectorAll("[data-testid=spot-price]")].every((e) => e.textContent !== "—"), undefined, "spot prices on every row");
      const spotRows = await tableRows(page);
      await page.click("button[data-market=FUTURES]");
      await until(page, () => [...document.querySelectorAll("[data-testid=futures-price]")].every((e) => e.textContent !== "—"), undefined, "futures prices on every row");
      const futuresRows = await tableRows(page);
      await page.click("button[data-market=ALL]");
      return `${spotRows} spot, ${futuresRows} futures`;
    });

    await check("columns sort both ways", page, async () => {
      await page.click("button[data-column=symbol]"); // already ascending: now descending
      let rows = await visibleRows(page);
      const names = rows.map((r) => r.symbol);
      if (names.join() !== [...names].sort().reverse().join()) throw new Error(`not descending: ${names.slice(0, 4)}`);
      await page.click("button[data-column=futures]"); // numbers: highest first
      await page.waitForTimeout(150);
      rows = await visibleRows(page);
      const prices = rows.map((r) => price(r.futures)).filter((p) => p !== null);
      for (let i = 1; i < prices.length; i++) {
        if (prices[i] > prices[i - 1]) throw new Error(`futures prices not descending at row ${i}: ${prices[i - 1]} then ${prices[i]}`);
      }
      await page.click("button[data-column=symbol]");
      await until(page, () => document.querySelector("[role=columnheader][aria-sort]")?.getAttribute("aria-sort") === "ascending", undefined, "symbol ascending");
      return `${prices.length} futures prices in order`;
    });

    await check("a favourite is pinned to the top and stays there after a reload", page, async () => {
      const firstRow = async () => {
        await page.evaluate(() => document.querySelector("[data-testid=market-table]").scrollTo(0, 0));
        await page.waitForTimeout(100);
        return (await visibleRows(page))[0]?.symbol;
      };
      const rows = await visibleRows(page);
      const pick = rows[Math.min(8, rows.length - 1)]?.symbol; // a row on screen, not the first
      if (!pick || rows.length < 2) throw new Error("need two rows");
      await page.click(`[role=row][data-symbol="${pick}"] button[aria-pressed]`);
      if ((await firstRow()) !== pick) throw new Error(`${await firstRow()} is on top, not ${pick}`);
      await page.reload();
      await page.waitForSelector(`[role=row][data-symbol="${pick}"] button[aria-pressed=true]`);
      const top = await firstRow();
      if (top !== pick) throw new Error(`after the reload ${top} is on top, not ${pick}`);
      await page.click(`[role=row][data-symbol="${pick}"] button[aria-pressed=true]`);
      return pick;
    });

    await screenshot(page, "market.png");

    await check("the phone layout fits 390 px without sideways scrolling", page, async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await page.waitForTimeout(300);
      const fit = await page.evaluate(() => {
        const el = document.querySelector("[data-testid=market-table]");
        const cols = [...document.querySelectorAll("[role=columnheader]")].filter((c) => c.getBoundingClientRect().width > 0).length;
        return { scroll: el.scrollWidth, client: el.clientWidth, page: document.documentElement.scrollWidth, cols };
      });
      if (fit.scroll > fit.client + 1 || fit.page > 390) throw new Error(JSON.stringify(fit));
      await screenshot(page, "market-phone.png");
      await page.setViewportSize({ width: 1280, height: 800 });
      return `${fit.cols} columns shown`;
    });

    await check(`the detail page draws ${symbol}'s candles and the live price`, page, async () => {
      await page.fill("[data-testid=search]", symbol);
      const link = page.locator(`[role=row][data-symbol="${symbol}"] a`);
      await link.click();
      await page.waitForURL(/\/market\/detail\/\?symbol=/);
      if (!page.url().includes(`market=${opts.market}`)) {
        await page.goto(`${base.replace(/\/+$/, "")}/market/detail/?symbol=${symbol}&market=${opts.market}`);
      }
      await page.waitForSelector("[data-testid=chart-status][data-state=ready]");
      const candles = Number(await page.getAttribute("[data-testid=candles]", "data-candles"));
      if (candles < Number(opts["min-candles"])) throw new Error(`${candles} candles (wanted ${opts["min-candles"]})`);
      const painted = await until(page, () => {
        let n = 0;
        for (const canvas of document.querySelectorAll("[data-testid=candles] canvas")) {
          const ctx = canvas.getContext("2d");
          if (!ctx || !canvas.width || !canvas.height) continue;
          const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
          for (let i = 3; i < data.length; i += 4 * 7) if (data[i] > 0) n++;
        }
        return n;
      }, undefined, "a painted chart");
      await until(page, () => /\d/.test(document.querySelector("[data-testid=live-price]")?.textContent ?? ""), undefined, "the live price");
      const first = await page.textContent("[data-testid=live-price]");
      await until(page, (p) => document.querySelector("[data-testid=live-price]")?.textContent !== p, first, "the live price to move");
      const status = await page.textContent("[data-testid=chart-status]");
      return `${candles} candles (${status}), ${painted} painted pixels sampled, live ${first}`;
    });

    await check("the interval picker reloads the candles", page, async () => {
      await page.click("button[data-interval='5m']");
      await page.waitForSelector("button[data-interval='5m'][aria-pressed=true]");
      await page.waitForSelector("[data-testid=chart-status][data-state=ready]");
      const candles = Number(await page.getAttribute("[data-testid=candles]", "data-candles"));
      await page.click("button[data-interval='1m']");
      await page.waitForSelector("[data-testid=chart-status][data-state=ready]");
      return `${candles} five-minute candles`;
    });

    await page.waitForTimeout(300);
    await screenshot(page, "detail.png");

    await check("no errors in the browser console", page, async () => {
      if (problems.length) throw new Error(problems.slice(0, 3).join(" | "));
    });
  } finally {
    await close();
  }
}

// --- performance ------------------------------------------------------------------------------

function percentile(values, p) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

const round = (x, d = 2) => (x === null ? null : Math.round(x * 10 ** d) / 10 ** d);

/** Frame intervals from requestAnimationFrame and the store's batch timings over `seconds`. */
async function measure(page, seconds) {
  const raw = await page.evaluate(async (ms) => {
    const stats = window.__sow.store.stats;
    Object.assign(stats, { batches: 0, quotes: 0, totalMs: 0, maxMs: 0, recentMs: [], recentBuildMs: [] });
    const frames = [];
    await new Promise((resolve) => {
      let last = performance.now();
      const start = last;
      const tick = (t) => {
        frames.push(t - last);
        last = t;
        if (t - start < ms) requestAnimationFrame(tick);
        else resolve();
      };
      requestAnimationFrame(tick);
    });
    return { frames, seconds: frames.reduce((a, b) => a + b, 0) / 1000, batches: stats.batches, quotes: stats.quotes, applyMs: stats.recentMs.slice(), buildMs: stats.recentBuildMs.slice(), maxApplyMs: stats.maxMs };
  }, seconds * 1000);
  const frames = raw.frames.slice(1); // the first interval starts before the loop
  return {
    seconds: round(raw.seconds),
    frames: frames.length,
    fps: round(frames.length / raw.seconds, 1),
    frame_ms: { p50: round(percentile(frames, 50)), p95: round(percentile(frames, 95)), p99: round(percentile(frames, 99)), max: round(Math.max(...frames)) },
    long_frames_over_33ms: frames.filter((f) => f > 33.4).length,
    store: {
      batches: raw.batches,
      quotes_per_s: round(raw.quotes / raw.seconds, 0),
      quotes_per_batch: round(raw.quotes / Math.max(1, raw.batches), 1),
      // the whole applyBatch call: new state built, then every subscribed selector run (rows, the
      // table's row order) — React renders afterwards, in the same frame
      apply_ms: { p50: round(percentile(raw.applyMs, 50), 3), p95: round(percentile(raw.applyMs, 95), 3), max: round(raw.maxApplyMs, 3) },
      // building the new state alone (before subscribers are told)
      build_ms: { p50: round(percentile(raw.buildMs, 50), 3), p95: round(percentile(raw.buildMs, 95), 3), max: round(raw.buildMs.length ? Math.max(...raw.buildMs) : null, 3) },
    },
  };
}

async function perf() {
  const symbols = Number(opts["perf-symbols"]);
  const rate = Number(opts["perf-rate"]);
  const seconds = Number(opts["perf-seconds"]);
  const hub = await startMockHub({ symbols, rate });
  const { page, close } = await launch();
  const report = { symbols, rate_per_s: rate, seconds, chromium: null, scenarios: {} };
  try {
    report.chromium = await page.evaluate(() => navigator.userAgent.match(/Chrom(e|ium)\/[\d.]+/)?.[0] ?? navigator.userAgent);
    await check(`perf: ${symbols} symbols load from the mock hub`, page, async () => {
      await page.goto(`${hub.url}/market/`);
      await page.waitForSelector("[data-testid=connection][data-status=open]");
      await until(page, (n) => document.querySelector("[data-testid=symbol-count]")?.textContent?.replace(/\D/g, "") === String(n), symbols, `${symbols} symbols`);
      await page.waitForTimeout(1000); // let the first snapshot settle
      return `${await tableRows(page)} rows`;
    });
    hub.pause(); // what this machine and browser manage with nothing changing
    await page.waitForTimeout(300);
    report.scenarios.baseline_no_updates = await measure(page, Math.min(seconds, 3));
    hub.resume();
    await page.waitForTimeout(300);
    report.scenarios.sorted_by_symbol = await measure(page, seconds);
    await page.click("button[data-column=spot]"); // rows now move on every price change
    await page.waitForTimeout(500);
    report.scenarios.sorted_by_price = await measure(page, seconds);
    await page.click("button[data-column=symbol]");
    await page.evaluate(() => document.querySelector("[data-testid=market-table]").scrollTo(0, 12_000));
    await page.waitForTimeout(500);
    report.scenarios.scrolled_mid_table = await measure(page, seconds);
    await screenshot(page, "market-perf.png");
    results.perf = report;
    for (const [name, s] of Object.entries(report.scenarios)) {
      log(
        `perf ${name}: ${s.fps} frames/s (p95 ${s.frame_ms.p95} ms, max ${s.frame_ms.max} ms, ${s.long_frames_over_33ms} over 33 ms); ` +
          `store ${s.store.quotes_per_s} quotes/s in ${s.store.batches} batches, apply p50 ${s.store.apply_ms.p50} ms p95 ${s.store.apply_ms.p95} ms max ${s.store.apply_ms.max} ms ` +
          `(building the state: p50 ${s.store.build_ms.p50} ms p95 ${s.store.build_ms.p95} ms)`,
      );
    }
    fs.writeFileSync(path.join(opts.artifacts, "perf.json"), `${JSON.stringify(report, null, 2)}\n`);
  } finally {
    await close();
    await hub.close();
  }
}

// --- main ---------------------------------------------------------------------------------

if (!opts.url && !opts.perf) {
  log("usage: node e2e/market.e2e.mjs --url http://127.0.0.1:8080 [--symbol BTCUSDT] [--rows N] [--perf]");
  process.exit(2);
}
if (!fs.existsSync(opts.chromium)) {
  log(`Chromium not found at ${opts.chromium} (apt-get install -y chromium, or set CHROMIUM_PATH)`);
  process.exit(3);
}
try {
  if (opts.url) await functional(opts.url);
  if (opts.perf) await perf();
} catch (err) {
  failed += 1;
  log(`not ok - the run stopped: ${err instanceof Error ? err.stack : err}`);
}
const name = opts.url ? "e2e-result.json" : "perf-result.json";
fs.writeFileSync(path.join(opts.artifacts, name), `${JSON.stringify(results, null, 2)}\n`);
log(`${results.checks.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
