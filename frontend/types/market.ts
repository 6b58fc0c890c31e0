/**
 * The wire contract between `sow serve-api` and the dashboard (ARCHITECTURE.md, "Contracts").
 *
 * `Quote` mirrors `sowcli.model.Quote` field for field; the browser WebSocket adds `timestamp`
 * (the exchange time `ts` as ISO-8601 UTC). Numbers are JSON numbers, unknown values `null`.
 */

export type Market = "SPOT" | "FUTURES";
export const MARKETS: readonly Market[] = ["SPOT", "FUTURES"];

export interface Quote {
  /** upper-case Bybit symbol, e.g. BTCUSDT */
  symbol: string;
  market: Market;
  /** last traded price */
  price: number;
  /** 24 h volume in base currency */
  volume: number | null;
  /** 24 h volume in quote currency */
  turnover: number | null;
  high24h: number | null;
  low24h: number | null;
  /** 24 h change in percent (Bybit's price24hPcnt × 100) */
  change24h: number | null;
  bid: number | null;
  ask: number | null;
  /** FUTURES only; null on SPOT */
  mark_price: number | null;
  index_price: number | null;
  funding_rate: number | null;
  open_interest: number | null;
  /** exchange event time, ms since the epoch */
  ts: number;
  /** hub receive time, µs since the epoch */
  recv_us: number;
  /** Bybit's cross sequence `cs` */
  seq: number | null;
  /** `ts` as ISO-8601 UTC (added by the WebSocket bridge and the REST API) */
  timestamp?: string;
}

/** `${symbol}:${market}` — the identity of one quote stream. */
export type QuoteKey = `${string}:${Market}`;

export function quoteKey(symbol: string, market: Market): QuoteKey {
  return `${symbol}:${market}`;
}

/** Price direction of the last change, for the flash: 1 up, -1 down, 0 unchanged/first. */
export type Tick = -1 | 0 | 1;

/** A quote as the store keeps it: the wire quote plus the direction of its last price change. */
export type LiveQuote = Quote & { tick: Tick };

// --- browser WebSocket (/ws) ---------------------------------------------------------------

export type ClientMessage =
  | { type: "subscribe"; symbols: string[] }
  | { type: "unsubscribe"; symbols: string[] }
  | { type: "ping" };

/** What `sow serve-api`'s `/ws` sends (sowcli/servers/ws.py). */
export type ServerMessage =
  | { type: "snapshot"; quotes: Quote[]; symbols?: string[]; cache?: boolean }
  /** changed quotes, conflated, at most every `ws_batch_ms` (100 ms); `batch` is accepted too */
  | { type: "quotes" | "batch"; quotes: Quote[] }
  | { type: "status"; nats?: string; batch_ms?: number; [field: string]: unknown }
  | { type: "unsubscribed"; symbols: string[] }
  | { type: "pong" }
  | { type: "error"; error?: string; detail?: string; [field: string]: unknown };

/** What the dashboard shows in its connection indicator. */
export type ConnectionStatus = "idle" | "connecting" | "open" | "reconnecting" | "closed";

// --- REST ---------------------------------------------------------------------------------

export const OHLC_INTERVALS = ["1m", "5m", "15m", "1h", "4h", "1d"] as const;
export type OhlcInterval = (typeof OHLC_INTERVALS)[number];

/** One candle as lightweight-charts wants it: `time` in seconds since the epoch (UTC). */
export interface Candle {
  time: number;
  open: number;
  high: number;
  low: number;
  close: number;
  ticks: number | null;
}
