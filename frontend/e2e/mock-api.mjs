#!/usr/bin/env node
/**
 * A stand-in for `sow serve-api` for working on the dashboard without the Python stack, and the
 * load generator of the browser performance measurement: it serves the static export at /market,
 * `GET /api/prices/latest`, `GET /api/prices/{symbol}/{market}/ohlc` and the `/ws` protocol
 * as `sowcli/servers/ws.py` speaks it (subscribe/unsubscribe/ping; a snapshot, then `quotes`
 * messages with the changed quotes every 100 ms).
 *
 *   node e2e/mock-api.mjs --port 8080 --symbols 1000 --rate 1000
 *   NEXT_PUBLIC_SOW_API=http://localhost:8080 npm run dev     # or open http://localhost:8080/market/
 *
 * The real end-to-end test (tests/test_frontend_e2e.py) runs against the real `sow serve-api`.
 */
import { createReadStream, existsSync, statSync } from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { WebSocketServer } from "ws";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BATCH_MS = 100;
const NAMED = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ADAUSDT", "LINKUSDT", "AVAXUSDT"];
const LEVELS = { BTCUSDT: 61_000, ETHUSDT: 3_050, SOLUSDT: 152, XRPUSDT: 0.61, DOGEUSDT: 0.12 };
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".json": "application/json",
  ".txt": "text/plain; charset=utf-8",
  ".svg": "image/svg+xml",
  ".ico": "image/x-icon",
  ".woff2": "font/woff2",
};

function symbolNames(count) {
  const names = NAMED.slice(0, count);
  for (let i = names.length; i < count; i++) names.push(`SYM${String(i).padStart(4, "0")}USDT`);
  return names;
}

/** Deterministic pseudo-random numbers (mulberry32), so runs are comparable. */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export class MockMarket {
  constructor({ symbols = 50, seed = 7 } = {}) {
    this.random = rng(seed);
    this.seq = 1;
    /** @type {Map<string, object>} */
    this.quotes = new Map();
    symbolNames(symbols).forEach((symbol, i) => {
      const level = LEVELS[symbol] ?? 10 ** (this.random() * 6 - 2);
      // every 10th symbol trades only as a perpetual, every 10th+5 only spot
      if (i % 10 !== 0) this.quotes.set(`${symbol}:SPOT`, this.make(symbol, "SPOT", level));
      if (i % 10 !== 5) this.quotes.set(`${symbol}:FUTURES`, this.make(symbol, "FUTURES", level * (1 + (this.random() - 0.45) * 0.002)));
    });
    this.keys = [...this.quotes.keys()];
  }

  make(symbol, market, price) {
    const ts = Date.now();
    const futures = market === "FUTURES";
    return {
      symbol,
      market,
      price,
      volume: 1e4 + this.random() * 1e6,
      turnover: price * (1e4 + this.random() * 1e6),
      high24h: price * 1.04,
      low24h: price * 0.95,
      change24h: (this.random() - 0.5) * 10,
      bid: price * 0.9999,
      ask: price * 1.0001,
      mark_price: futures ? price : null,
      index_price: futures ? price : null,
      funding_rate: futures ? 0.0001 : null,
      open_interest: futures ? 1e5 : null,
      ts,
      recv_us: ts * 1000,
      seq: this.seq++,
      timestamp: new Date(ts).toISOString(),
    };
  }

  /** Moves `count` random quotes; returns the changed ones. */
  step(count) {
    const changed = new Map();
    for (let i = 0; i < count; i++) {
      const key = this.keys[Math.floor(this.random() * this.keys.length)];
      const q = this.quotes.get(key);
      const price = q.price * (1 + (this.random() - 0.5) * 0.002);
      const ts = Date.now();
      const next = {
        ...q,
        price,
        high24h: Math.max(q.high24h, price),
        low24h: Math.min(q.low24h, price),
        bid: price * 0.9999,
        ask: price * 1.0001,
        mark_price: q.market === "FUTURES" ? price : null,
        ts,
        recv_us: ts * 1000,
        seq: this.seq++,
        timestamp: new Date(ts).toISOString(),
      };
      this.quotes.set(key, next);
      changed.set(key, next);
    }
    return [...changed.values()];
  }

  candles(symbol, market, intervalS, count = 300) {
    const q = this.quotes.get(`${symbol}:${market}`);
    if (!q) return [];
    const now = Math.floor(Date.now() / 1000 / intervalS) * intervalS;
    const out = [];
    let close = q.price;
    for (let i = 0; i < count; i++) {
      const open = close * (1 + (this.random() - 0.5) * 0.004);
      const high = Math.max(open, close) * (1 + this.random() * 0.002);
      const low = Math.min(open, close) * (1 - this.random() * 0.002);
      out.push({ timestamp: new Date((now - i * intervalS) * 1000).toISOString(), open, high, low, close, ticks: 10 });
      close = open;
    }
    return out.reverse();
  }
}

const INTERVALS = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14_400, "1d": 86_400 };

function sendJson(res, status, body) {
  res.writeHead(status, { "content-type": "application/json", "access-control-allow-origin": "*" });
  res.end(JSON.stringify(body));
}

function serveStatic(outDir, req, res) {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/market") {
    res.writeHead(307, { location: `/market/${url.search}` });
    return res.end();
  }
  let rel = decodeURIComponent(url.pathname.slice("/market".length));
  if (rel.endsWith("/")) rel += "index.html";
  const file = path.join(outDir, path.normalize(rel));
  if (!file.startsWith(outDir) || !existsSync(file) || !statSync(file).isFile()) {
    return sendJson(res, 404, { error: "not_found", detail: "not found" });
  }
  res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" });
  createReadStream(file).pipe(res);
}

/**
 * Starts the mock hub; resolves to `{ url, market, close() }`.
 * `rate` quote updates per second are spread over the 100 ms batches.
 */
export async function startMockHub({ port = 0, host = "127.0.0.1", symbols = 50, rate = 100, outDir = path.resolve(HERE, "../out") } = {}) {
  const market = new MockMarket({ symbols });
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    if (url.pathname.startsWith("/market")) return serveStatic(outDir, req, res);
    if (url.pathname === "/api/prices/latest") return sendJson(res, 200, [...market.quotes.values()]);
    const ohlc = url.pathname.match(/^\/api\/prices\/([A-Z0-9]+)\/(SPOT|FUTURES)\/ohlc$/i);
    if (ohlc) {
      const intervalS = INTERVALS[url.searchParams.get("interval") ?? "1m"];
      if (!intervalS) return sendJson(res, 400, { error: "bad_request", detail: "interval: expected one of 1m 5m 15m 1h 4h 1d" });
      const candles = market.candles(ohlc[1].toUpperCase(), ohlc[2].toUpperCase(), intervalS);
      return sendJson(res, 200, { symbol: ohlc[1].toUpperCase(), market: ohlc[2].toUpperCase(), count: candles.length, candles });
    }
    if (url.pathname === "/health") return sendJson(res, 200, { status: "ok", mock: true });
    sendJson(res, 404, { error: "not_found", detail: "not found" });
  });

  const wss = new WebSocketServer({ server, path: "/ws" });
  const clients = new Map(); // ws -> Set of symbols ("*" = all)
  const wanted = (subs, q) => subs.has("*") || subs.has(q.symbol);
  wss.on("connection", (ws) => {
    clients.set(ws, new Set());
    ws.send(JSON.stringify({ type: "status", nats: "connected", batch_ms: BATCH_MS, mock: true }));
    ws.on("message", (data) => {
      let msg;
      try {
        msg = JSON.parse(String(data));
      } catch {
        return ws.send(JSON.stringify({ type: "error", error: "bad_request", detail: "not JSON" }));
      }
      const subs = clients.get(ws);
      const symbols = Array.isArray(msg.symbols) ? msg.symbols.map((s) => String(s).toUpperCase()) : [];
      if (msg.type === "subscribe") {
        symbols.forEach((s) => subs.add(s));
        const quotes = [...market.quotes.values()].filter((q) => symbols.includes("*") || symbols.includes(q.symbol));
        ws.send(JSON.stringify({ type: "snapshot", quotes }));
      } else if (msg.type === "unsubscribe") {
        symbols.forEach((s) => subs.delete(s));
        ws.send(JSON.stringify({ type: "unsubscribed", symbols }));
      } else if (msg.type === "ping") {
        ws.send(JSON.stringify({ type: "pong" }));
      } else {
        ws.send(JSON.stringify({ type: "error", error: "bad_request", detail: `unknown message type ${msg.type}` }));
      }
    });
    ws.on("close", () => clients.delete(ws));
  });

  const perBatch = Math.max(0, Math.round((rate * BATCH_MS) / 1000));
  let sent = 0;
  let paused = false;
  const timer = setInterval(() => {
    if (paused) return;
    const changed = market.step(perBatch);
    sent += changed.length;
    for (const [ws, subs] of clients) {
      const quotes = changed.filter((q) => wanted(subs, q));
      if (quotes.length && ws.readyState === 1) ws.send(JSON.stringify({ type: "quotes", quotes }));
    }
  }, BATCH_MS);

  await new Promise((resolve) => server.listen(port, host, resolve));
  const address = server.address();
  return {
    url: `http://${host}:${address.port}`,
    market,
    sent: () => sent,
    /** stop / restart the updates (the baseline of the performance measurement) */
    pause: () => {
      paused = true;
    },
    resume: () => {
      paused = false;
    },
    close: () =>
      new Promise((resolve) => {
        clearInterval(timer);
        for (const ws of clients.keys()) ws.terminate();
        wss.close();
        server.close(() => resolve());
      }),
  };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const arg = (name, fallback) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? Number(process.argv[i + 1]) : fallback;
  };
  const hub = await startMockHub({ port: arg("port", 8080), symbols: arg("symbols", 200), rate: arg("rate", 200) });
  console.log(`mock hub on ${hub.url} (dashboard: ${hub.url}/market/); Ctrl-C to stop`);
  process.on("SIGINT", () => hub.close().then(() => process.exit(0)));
}
