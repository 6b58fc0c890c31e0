/**
 * The browser's connection to the hub's `/ws` bridge.
 *
 * `MarketSocket` owns one WebSocket: it subscribes, parses every message in the socket's event
 * handler (never during render), conflates quotes per symbol and market, and hands the store ONE
 * batch per animation frame. When the connection drops it reconnects with exponential backoff
 * and jitter and subscribes again; a connection that stays silent is pinged, and replaced when
 * even the ping goes unanswered (a half-open TCP connection never reports its own death).
 * `useWebSocket` runs one for a component's lifetime and writes its status into the store for the
 * connection indicator.
 *
 * Server messages understood (sowcli/servers/ws.py): `snapshot` and `quotes` (also accepted as
 * `batch`) carry `quotes`; `error` carries `detail`/`error`/`message`; `status`, `pong` and
 * `unsubscribed` are informational.
 */
"use client";

import { useEffect, useRef } from "react";

import { wsUrl } from "@/lib/api";
import { marketStore, type MarketStore } from "@/store/marketStore";
import {
  quoteKey,
  type ClientMessage,
  type ConnectionStatus,
  type Quote,
  type QuoteKey,
} from "@/types/market";

/** The part of the DOM WebSocket that MarketSocket uses (tests pass a fake). */
export interface SocketLike {
  readonly readyState: number;
  onopen: ((ev: Event) => void) | null;
  onmessage: ((ev: MessageEvent) => void) | null;
  onclose: ((ev: CloseEvent) => void) | null;
  onerror: ((ev: Event) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type SocketFactory = (url: string) => SocketLike;

export interface Backoff {
  /** first retry delay (ms) */
  initialMs: number;
  /** cap on the delay (ms) */
  maxMs: number;
  factor: number;
  /** 0..1: the share of each delay that is random ("equal jitter" at 0.5) */
  jitter: number;
}

export const DEFAULT_BACKOFF: Backoff = { initialMs: 500, maxMs: 30_000, factor: 2, jitter: 0.5 };

/** Delay before reconnect attempt `attempt` (1-based): exponential, capped, partly random. */
export function backoffDelay(attempt: number, backoff: Backoff = DEFAULT_BACKOFF, random = Math.random): number {
  const base = Math.min(backoff.maxMs, backoff.initialMs * backoff.factor ** Math.max(0, attempt - 1));
  return Math.round(base * (1 - backoff.jitter) + base * backoff.jitter * random());
}

export interface StatusUpdate {
  status: ConnectionStatus;
  attempt: number;
  retryAt: number | null;
  error: string | null;
}

export interface MarketSocketOptions {
  url: string;
  /** symbols to subscribe to; `["*"]` is every symbol */
  symbols: readonly string[];
  /** receives the quotes of one frame, conflated (the newest per symbol and market) */
  onBatch: (quotes: Quote[]) => void;
  onStatus: (update: StatusUpdate) => void;
  createSocket?: SocketFactory;
  backoff?: Backoff;
  random?: () => number;
  /** schedules the flush; defaults to requestAnimationFrame (a 16 ms timer without one) */
  scheduleFrame?: (flush: () => void) => void;
  /** after this long without a message, send `{"type":"ping"}` (0: never); default 15 s */
  pingAfterMs?: number;
  /** after this long without a message (ping unanswered), reconnect; default 40 s */
  staleAfterMs?: number;
}

export const PING_AFTER_MS = 15_000;
export const STALE_AFTER_MS = 40_000;

const CONNECTING = 0;
const OPEN = 1;

function defaultScheduleFrame(flush: () => void): void {
  if (typeof requestAnimationFrame === "function") requestAnimationFrame(() => flush());
  else setTimeout(flush, 16);
}

export class MarketSocket {
  private socket: SocketLike | null = null;
  private symbols: string[];
  private attempt = 0;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private stopped = true;
  private pending = new Map<QuoteKey, Quote>();
  private frameScheduled = false;
  private lastError: string | null = null;
  private lastMessageAt = 0;
  private watchdog: ReturnType<typeof setInterval> | null = null;
  /** messages that were not JSON or not understood, for diagnostics */
  rejected = 0;

  constructor(private readonly options: MarketSocketOptions) {
    this.symbols = [...options.symbols];
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    this.clearRetry();
    this.discardSocket(1000, "client stopped");
    this.pending.clear();
    this.report("closed", null);
  }

  private discardSocket(code: number, reason: string): void {
    this.stopWatchdog();
    const socket = this.socket;
    this.socket = null;
    if (!socket) return;
    socket.onmessage = socket.onclose = socket.onerror = null;
    if (socket.readyState === CONNECTING) {
      // closing a socket that is still connecting makes browsers log an error: close on open
      socket.onopen = () => socket.close(code, reason);
    } else {
      socket.onopen = null;
      socket.close(code, reason);
    }
  }

  /** Connect now instead of waiting for the backoff (e.g. when the browser comes back online). */
  reconnectNow(): void {
    if (this.stopped || this.socket) return;
    this.clearRetry();
    this.connect();
  }

  /** Change the subscription on the open socket (unsubscribe what is gone, subscribe the new). */
  setSymbols(symbols: readonly string[]): void {
    const next = [...new Set(symbols)];
    const removed = this.symbols.filter((s) => !next.includes(s));
    const added = next.filter((s) => !this.symbols.includes(s));
    this.symbols = next;
    if (removed.length) this.send({ type: "unsubscribe", symbols: removed });
    if (added.length) this.send({ type: "subscribe", symbols: added });
  }

  private connect(): void {
    this.report(this.attempt === 0 ? "connecting" : "reconnecting", null);
    let socket: SocketLike;
    try {
      socket = (this.options.createSocket ?? ((url) => new WebSocket(url)))(this.options.url);
    } catch (exc) {
      this.lastError = exc instanceof Error ? exc.message : String(exc);
      this.scheduleRetry();
      return;
    }
    this.socket = socket;
    socket.onopen = () => {
      this.lastError = null;
      this.lastMessageAt = Date.now();
      this.send({ type: "subscribe", symbols: this.symbols });
      this.startWatchdog();
      this.report("open", null);
    };
    socket.onmessage = (ev) => this.receive(ev.data);
    socket.onerror = () => {
      this.lastError = "connection error";
    };
    socket.onclose = (ev) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.stopWatchdog();
      if (ev.code !== 1000 && ev.code !== 1005) {
        this.lastError = ev.reason ? `closed: ${ev.reason} (${ev.code})` : `closed (${ev.code})`;
      }
      if (!this.stopped) this.scheduleRetry();
    };
  }

  private startWatchdog(): void {
    const pingAfter = this.options.pingAfterMs ?? PING_AFTER_MS;
    const staleAfter = this.options.staleAfterMs ?? STALE_AFTER_MS;
    if (pingAfter <= 0 && staleAfter <= 0) return;
    const every = Math.max(250, Math.min(...[pingAfter, staleAfter].filter((ms) => ms > 0)) / 3);
    this.stopWatchdog();
    this.watchdog = setInterval(() => {
      const quiet = Date.now() - this.lastMessageAt;
      if (staleAfter > 0 && quiet >= staleAfter) {
        this.lastError = `no answer for ${Math.round(quiet / 1000)} s`;
        this.discardSocket(4000, "stale");
        if (!this.stopped) this.scheduleRetry();
      } else if (pingAfter > 0 && quiet >= pingAfter) {
        this.send({ type: "ping" });
      }
    }, every);
  }

  private stopWatchdog(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  private scheduleRetry(): void {
    this.attempt += 1;
    const delay = backoffDelay(this.attempt, this.options.backoff, this.options.random);
    this.report("reconnecting", Date.now() + delay);
    this.clearRetry();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (!this.stopped) this.connect();
    }, delay);
  }

  private clearRetry(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private send(message: ClientMessage): void {
    if (this.socket?.readyState === OPEN) this.socket.send(JSON.stringify(message));
  }

  private receive(data: unknown): void {
    this.lastMessageAt = Date.now();
    if (typeof data !== "string") {
      this.rejected += 1;
      return;
    }
    let message: unknown;
    try {
      message = JSON.parse(data);
    } catch {
      this.rejected += 1;
      return;
    }
    if (!message || typeof message !== "object") {
      this.rejected += 1;
      return;
    }
    const msg = message as { type?: unknown; quotes?: unknown; detail?: unknown; message?: unknown; error?: unknown };
    if ((msg.type === "snapshot" || msg.type === "quotes" || msg.type === "batch") && Array.isArray(msg.quotes)) {
      if (this.attempt !== 0) {
        this.attempt = 0; // the server is serving again: the next outage starts from the shortest delay
        this.report("open", null);
      }
      this.enqueue(msg.quotes as Quote[]);
    } else if (msg.type === "error") {
      const text = msg.detail ?? msg.message ?? msg.error;
      this.lastError = typeof text === "string" ? text : JSON.stringify(message);
      this.report("open", null);
    } else if (msg.type !== "status" && msg.type !== "pong" && msg.type !== "unsubscribed") {
      this.rejected += 1;
    }
  }

  private enqueue(quotes: Quote[]): void {
    for (const q of quotes) {
      if (q && typeof q.symbol === "string") this.pending.set(quoteKey(q.symbol, q.market), q);
    }
    if (this.frameScheduled || this.pending.size === 0) return;
    this.frameScheduled = true;
    (this.options.scheduleFrame ?? defaultScheduleFrame)(() => this.flush());
  }

  private flush(): void {
    this.frameScheduled = false;
    if (this.pending.size === 0) return;
    const batch = [...this.pending.values()];
    this.pending = new Map();
    this.options.onBatch(batch);
  }

  private report(status: ConnectionStatus, retryAt: number | null): void {
    this.options.onStatus({ status, attempt: this.attempt, retryAt, error: this.lastError });
  }
}

export interface UseWebSocketOptions {
  /** symbols to subscribe to (default: every symbol) */
  symbols?: readonly string[];
  url?: string;
  store?: MarketStore;
  createSocket?: SocketFactory;
  backoff?: Backoff;
}

const ALL = ["*"];

/** Keeps one MarketSocket running while the component is mounted, feeding `store`. */
export function useWebSocket({
  symbols = ALL,
  url,
  store = marketStore,
  createSocket,
  backoff,
}: UseWebSocketOptions = {}): void {
  const socketRef = useRef<MarketSocket | null>(null);
  const symbolsRef = useRef(symbols);
  const symbolList = symbols.join(",");

  useEffect(() => {
    const socket = new MarketSocket({
      url: url ?? wsUrl(),
      symbols: symbolsRef.current,
      createSocket,
      backoff,
      onBatch: (quotes) => store.getState().applyBatch(quotes),
      onStatus: (update) => store.getState().setConnection(update),
    });
    socketRef.current = socket;
    socket.start();
    const online = () => socket.reconnectNow();
    window.addEventListener("online", online);
    return () => {
      window.removeEventListener("online", online);
      socket.stop();
      socketRef.current = null;
    };
  }, [url, store, createSocket, backoff]);

  useEffect(() => {
    symbolsRef.current = symbolList ? symbolList.split(",") : [];
    socketRef.current?.setSymbols(symbolsRef.current);
  }, [symbolList]);
}
