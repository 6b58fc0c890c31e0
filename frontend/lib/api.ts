/**
 * Where the hub is, and the one REST call the dashboard makes (OHLC candles).
 *
 * The base URL is `NEXT_PUBLIC_SOW_API` (inlined at build time, e.g. `http://localhost:8080`) or,
 * by default, the page's own origin — the case when `sow serve-api` serves the exported dashboard.
 */
import type { Candle, Market, OhlcInterval } from "@/types/market";

const INTERVAL_S: Record<OhlcInterval, number> = {
  "1m": 60,
  "5m": 300,
  "15m": 900,
  "1h": 3600,
  "4h": 14_400,
  "1d": 86_400,
};

/** How many candles the chart asks for (well below the API's bucket cap). */
export const CANDLES_PER_CHART = 300;

export function apiBase(): string {
  const configured = process.env.NEXT_PUBLIC_SOW_API?.trim();
  if (configured) return configured.replace(/\/+$/, "");
  return typeof window === "undefined" ? "" : window.location.origin;
}

/** `http(s)://host[/prefix]` -> `ws(s)://host[/prefix]/ws`. */
export function wsUrl(base: string = apiBase()): string {
  return `${base.replace(/^http/, "ws")}/ws`;
}

export function intervalSeconds(interval: OhlcInterval): number {
  return INTERVAL_S[interval];
}

export function ohlcUrl(
  symbol: string,
  market: Market,
  interval: OhlcInterval,
  nowMs: number = Date.now(),
  base: string = apiBase(),
): string {
  const from = new Date(nowMs - CANDLES_PER_CHART * INTERVAL_S[interval] * 1000).toISOString();
  const params = new URLSearchParams({ interval, from, to: new Date(nowMs).toISOString() });
  const path = `/api/prices/${encodeURIComponent(symbol)}/${market}/ohlc`;
  return `${base}${path}?${params.toString()}`;
}

function num(value: unknown): number | null {
  if (typeof value === "number") return Number.isFinite(value) ? value : null;
  if (typeof value === "string" && value.trim() !== "") {
    const n = Number(value);
    return Number.isFinite(n) ? n : null;
  }
  return null;
}

/** ISO-8601 string, or epoch seconds / ms / µs -> whole seconds since the epoch. */
function epochSeconds(value: unknown): number | null {
  if (typeof value === "string" && !/^\d+(\.\d+)?$/.test(value)) {
    const ms = Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : `${value}Z`);
    return Number.isNaN(ms) ? null : Math.floor(ms / 1000);
  }
  const n = num(value);
  if (n === null) return null;
  if (n >= 1e14) return Math.floor(n / 1e6); // µs
  if (n >= 1e11) return Math.floor(n / 1e3); // ms
  return Math.floor(n);
}

const OHLC_COLUMNS = ["timestamp", "open", "high", "low", "close", "ticks"];

/**
 * The API's OHLC body -> candles, oldest first, one per time.
 *
 * The only place that knows the response shape. It accepts a bare list or one wrapped in
 * `rows`/`data`/`candles`, rows as objects (`timestamp|time|ts`, `open`, `high`, `low`, `close`,
 * `ticks`) or as arrays in `sow query ohlc`'s column order (or the body's own `columns`).
 */
export function toCandles(body: unknown): Candle[] {
  let rows: unknown = body;
  let columns = OHLC_COLUMNS;
  if (rows && typeof rows === "object" && !Array.isArray(rows)) {
    const doc = rows as Record<string, unknown>;
    rows = doc.rows ?? doc.data ?? doc.candles ?? doc.ohlc ?? [];
    if (Array.isArray(doc.columns) && doc.columns.every((c) => typeof c === "string")) {
      columns = doc.columns as string[];
    }
  }
  if (!Array.isArray(rows)) return [];
  const byTime = new Map<number, Candle>();
  for (const raw of rows) {
    let row: Record<string, unknown>;
    if (Array.isArray(raw)) {
      row = Object.fromEntries(columns.map((c, i) => [c, raw[i]]));
    } else if (raw && typeof raw === "object") {
      row = raw as Record<string, unknown>;
    } else {
      continue;
    }
    const time = epochSeconds(row.timestamp ?? row.time ?? row.ts);
    const open = num(row.open);
    const high = num(row.high);
    const low = num(row.low);
    const close = num(row.close);
    if (time === null || open === null || high === null || low === null || close === null) continue;
    byTime.set(time, { time, open, high, low, close, ticks: num(row.ticks ?? row.count) });
  }
  return [...byTime.values()].sort((a, b) => a.time - b.time);
}

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export async function fetchOhlc(
  symbol: string,
  market: Market,
  interval: OhlcInterval,
  signal?: AbortSignal,
): Promise<Candle[]> {
  const resp = await fetch(ohlcUrl(symbol, market, interval), { signal });
  const text = await resp.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!resp.ok) {
    const doc = (body ?? {}) as Record<string, unknown>;
    const detail = doc.detail ?? doc.error ?? doc.message ?? text.slice(0, 200);
    throw new ApiError(`${resp.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`, resp.status);
  }
  return toCandles(body);
}
