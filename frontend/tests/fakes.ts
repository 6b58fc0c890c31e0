/** Test doubles: a scripted WebSocket, quotes, and an in-memory localStorage. */
import type { SocketLike } from "@/hooks/useWebSocket";
import type { Market, Quote } from "@/types/market";

export class FakeSocket implements SocketLike {
  static instances: FakeSocket[] = [];
  readyState = 0;
  sent: unknown[] = [];
  closedWith: number | null = null;
  onopen: ((ev: Event) => void) | null = null;
  onmessage: ((ev: MessageEvent) => void) | null = null;
  onclose: ((ev: CloseEvent) => void) | null = null;
  onerror: ((ev: Event) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.instances.push(this);
  }

  static reset(): void {
    FakeSocket.instances = [];
  }

  static get last(): FakeSocket {
    const socket = FakeSocket.instances.at(-1);
    if (!socket) throw new Error("no socket was created");
    return socket;
  }

  send(data: string): void {
    this.sent.push(JSON.parse(data));
  }

  close(code = 1000): void {
    this.closedWith = code;
    this.readyState = 3;
  }

  // --- the server side -------------------------------------------------------------------
  open(): void {
    this.readyState = 1;
    this.onopen?.(new Event("open"));
  }

  receive(message: unknown): void {
    const data = typeof message === "string" ? message : JSON.stringify(message);
    this.onmessage?.({ data } as MessageEvent);
  }

  /** The connection is lost (or refused: call without open()). */
  drop(code = 1006, reason = ""): void {
    this.readyState = 3;
    this.onerror?.(new Event("error"));
    this.onclose?.({ code, reason, wasClean: false } as CloseEvent);
  }
}

export const createFakeSocket = (url: string) => new FakeSocket(url);

let seq = 1000;

export function quote(symbol: string, market: Market, price: number, extra: Partial<Quote> = {}): Quote {
  seq += 1;
  const ts = extra.ts ?? 1_786_000_000_000 + seq;
  return {
    symbol,
    market,
    price,
    volume: 10,
    turnover: price * 10,
    high24h: price * 1.05,
    low24h: price * 0.95,
    change24h: 1.5,
    bid: price - 0.5,
    ask: price + 0.5,
    mark_price: market === "FUTURES" ? price : null,
    index_price: market === "FUTURES" ? price : null,
    funding_rate: market === "FUTURES" ? 0.0001 : null,
    open_interest: market === "FUTURES" ? 1000 : null,
    ts,
    recv_us: ts * 1000,
    seq,
    timestamp: new Date(ts).toISOString(),
    ...extra,
  };
}

export class MemoryStorage {
  private items = new Map<string, string>();
  getItem(key: string): string | null {
    return this.items.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    this.items.set(key, value);
  }
  removeItem(key: string): void {
    this.items.delete(key);
  }
  clear(): void {
    this.items.clear();
  }
}
