import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { backoffDelay, DEFAULT_BACKOFF, MarketSocket, type StatusUpdate } from "@/hooks/useWebSocket";
import type { Quote } from "@/types/market";

import { createFakeSocket, FakeSocket, quote } from "./fakes";

function harness(symbols: string[] = ["*"], random = () => 0.5) {
  const batches: Quote[][] = [];
  const statuses: StatusUpdate[] = [];
  const frames: (() => void)[] = [];
  const socket = new MarketSocket({
    url: "ws://hub.test/ws",
    symbols,
    onBatch: (quotes) => batches.push(quotes),
    onStatus: (update) => statuses.push(update),
    createSocket: createFakeSocket,
    random,
    scheduleFrame: (flush) => frames.push(flush),
  });
  const frame = () => {
    const pending = frames.splice(0);
    for (const flush of pending) flush();
    return pending.length;
  };
  const status = () => statuses.at(-1)?.status;
  return { socket, batches, statuses, frames, frame, status };
}

beforeEach(() => {
  FakeSocket.reset();
  vi.useFakeTimers();
  vi.setSystemTime(new Date("2026-08-10T12:00:00Z"));
});
afterEach(() => {
  vi.useRealTimers();
});

describe("backoffDelay", () => {
  it("doubles from the first delay up to the cap", () => {
    const noJitter = { ...DEFAULT_BACKOFF, jitter: 0 };
    expect([1, 2, 3, 4, 5].map((n) => backoffDelay(n, noJitter))).toEqual([500, 1000, 2000, 4000, 8000]);
    expect(backoffDelay(30, noJitter)).toBe(30_000);
  });

  it("adds jitter so that clients dropped together do not return together", () => {
    expect(backoffDelay(3, DEFAULT_BACKOFF, () => 0)).toBe(1000);
    expect(backoffDelay(3, DEFAULT_BACKOFF, () => 0.999999)).toBe(2000);
    const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(4, DEFAULT_BACKOFF)));
    expect(spread.size).toBeGreaterThan(10);
  });
});

describe("MarketSocket", () => {
  it("subscribes when the socket opens", () => {
    const h = harness(["BTCUSDT", "ETHUSDT"]);
    h.socket.start();
    expect(h.status()).toBe("connecting");
    expect(FakeSocket.last.url).toBe("ws://hub.test/ws");
    FakeSocket.last.open();
    expect(FakeSocket.last.sent).toEqual([{ type: "subscribe", symbols: ["BTCUSDT", "ETHUSDT"] }]);
    expect(h.status()).toBe("open");
  });

  it("hands over one conflated batch per frame, however many messages arrive", () => {
    const h = harness();
    h.socket.start();
    const ws = FakeSocket.last;
    ws.open();
    ws.receive({ type: "snapshot", quotes: [quote("BTCUSDT", "SPOT", 1), quote("BTCUSDT", "FUTURES", 2)] });
    ws.receive({ type: "quotes", quotes: [quote("BTCUSDT", "SPOT", 3), quote("ETHUSDT", "SPOT", 4)] });
    ws.receive({ type: "batch", quotes: [quote("BTCUSDT", "SPOT", 5)] }); // the brief's name, accepted too
    expect(h.batches).toHaveLength(0); // nothing until the frame
    expect(h.frame()).toBe(1); // one frame was scheduled for three messages
    expect(h.batches).toHaveLength(1);
    const prices = Object.fromEntries(h.batches[0]!.map((q) => [`${q.symbol}:${q.market}`, q.price]));
    expect(prices).toEqual({ "BTCUSDT:SPOT": 5, "BTCUSDT:FUTURES": 2, "ETHUSDT:SPOT": 4 });

    ws.receive({ type: "quotes", quotes: [quote("ETHUSDT", "SPOT", 6)] });
    expect(h.frame()).toBe(1);
    expect(h.batches).toHaveLength(2);
    expect(h.frame()).toBe(0); // no message, no frame
  });

  it("ignores what it cannot read, and shows server errors", () => {
    const h = harness();
    h.socket.start();
    const ws = FakeSocket.last;
    ws.open();
    ws.receive("{not json");
    ws.receive({ type: "mystery" });
    ws.receive({ type: "status", nats: "connected", batch_ms: 100 });
    ws.receive({ type: "pong" });
    ws.receive({ type: "unsubscribed", symbols: ["FOOUSDT"] });
    ws.receive({ type: "error", error: "bad_request", detail: "symbol 'x': not a valid symbol" });
    h.frame();
    expect(h.batches).toHaveLength(0);
    expect(h.socket.rejected).toBe(2);
    expect(h.statuses.at(-1)).toMatchObject({ status: "open", error: "symbol 'x': not a valid symbol" });
  });

  it("reconnects with growing, jittered delays and subscribes again", () => {
    const h = harness(["BTCUSDT"]);
    h.socket.start();
    FakeSocket.last.open();
    FakeSocket.last.drop(1006);
    expect(h.status()).toBe("reconnecting");
    expect(h.statuses.at(-1)).toMatchObject({ attempt: 1, retryAt: Date.now() + 375, error: "closed (1006)" });

    vi.advanceTimersByTime(374);
    expect(FakeSocket.instances).toHaveLength(1);
    vi.advanceTimersByTime(1);
    expect(FakeSocket.instances).toHaveLength(2);

    // refused twice more: each wait is twice as long (random() = 0.5: 3/4 of the base)
    FakeSocket.last.drop(1006);
    expect(h.statuses.at(-1)?.retryAt).toBe(Date.now() + 750);
    vi.advanceTimersByTime(750);
    FakeSocket.last.drop(1006);
    expect(h.statuses.at(-1)?.retryAt).toBe(Date.now() + 1500);
    vi.advanceTimersByTime(1500);
    expect(FakeSocket.instances).toHaveLength(4);

    const ws = FakeSocket.last;
    ws.open();
    expect(ws.sent).toEqual([{ type: "subscribe", symbols: ["BTCUSDT"] }]);
    expect(h.status()).toBe("open");
    ws.receive({ type: "snapshot", quotes: [quote("BTCUSDT", "SPOT", 1)] });

    // served again: the next outage starts from the shortest delay
    ws.drop(1011, "server restart");
    expect(h.statuses.at(-1)).toMatchObject({
      attempt: 1,
      retryAt: Date.now() + 375,
      error: "closed: server restart (1011)",
    });
  });

  it("keeps the subscription across reconnects after setSymbols", () => {
    const h = harness(["BTCUSDT"]);
    h.socket.start();
    FakeSocket.last.open();
    h.socket.setSymbols(["ETHUSDT", "SOLUSDT"]);
    expect(FakeSocket.last.sent.slice(1)).toEqual([
      { type: "unsubscribe", symbols: ["BTCUSDT"] },
      { type: "subscribe", symbols: ["ETHUSDT", "SOLUSDT"] },
    ]);
    FakeSocket.last.drop();
    vi.runOnlyPendingTimers();
    FakeSocket.last.open();
    expect(FakeSocket.last.sent).toEqual([{ type: "subscribe", symbols: ["ETHUSDT", "SOLUSDT"] }]);
  });

  it("stops for good: closes the socket and never reconnects", () => {
    const h = harness();
    h.socket.start();
    const ws = FakeSocket.last;
    ws.open();
    ws.receive({ type: "quotes", quotes: [quote("BTCUSDT", "SPOT", 1)] });
    h.socket.stop();
    expect(ws.closedWith).toBe(1000);
    expect(h.status()).toBe("closed");
    h.frame();
    expect(h.batches).toHaveLength(0); // nothing delivered after stop
    vi.advanceTimersByTime(120_000);
    expect(FakeSocket.instances).toHaveLength(1);
  });

  it("pings a silent connection and replaces it when even the ping goes unanswered", () => {
    const h = harness();
    h.socket.start();
    const ws = FakeSocket.last;
    ws.open();
    vi.advanceTimersByTime(10_000);
    ws.receive({ type: "quotes", quotes: [quote("BTCUSDT", "SPOT", 1)] });
    vi.advanceTimersByTime(14_000); // 14 s of silence: nothing yet
    expect(ws.sent).toEqual([{ type: "subscribe", symbols: ["*"] }]);
    vi.advanceTimersByTime(6_000);
    expect(ws.sent.at(-1)).toEqual({ type: "ping" });
    ws.receive({ type: "pong" }); // alive: the clock starts again
    vi.advanceTimersByTime(39_000);
    expect(h.status()).toBe("open");
    vi.advanceTimersByTime(6_000); // 40 s without a word
    expect(ws.closedWith).toBe(4000);
    expect(h.statuses.at(-1)).toMatchObject({ status: "reconnecting", attempt: 1, error: "no answer for 40 s" });
    vi.advanceTimersByTime(500);
    expect(FakeSocket.instances).toHaveLength(2);
  });

  it("stops while still connecting: the socket is closed as soon as it opens", () => {
    const h = harness();
    h.socket.start();
    const ws = FakeSocket.last;
    h.socket.stop();
    expect(ws.closedWith).toBeNull(); // browsers complain about closing a connecting socket
    ws.open();
    expect(ws.closedWith).toBe(1000);
    expect(ws.sent).toEqual([]); // no subscription from a stopped client
  });

  it("stops while waiting to reconnect", () => {
    const h = harness();
    h.socket.start();
    FakeSocket.last.drop();
    h.socket.stop();
    vi.advanceTimersByTime(120_000);
    expect(FakeSocket.instances).toHaveLength(1);
  });

  it("reconnects at once when asked (the browser came back online)", () => {
    const h = harness();
    h.socket.start();
    FakeSocket.last.drop();
    h.socket.reconnectNow();
    expect(FakeSocket.instances).toHaveLength(2);
    h.socket.reconnectNow(); // already connecting: no second socket
    expect(FakeSocket.instances).toHaveLength(2);
    vi.advanceTimersByTime(60_000);
    expect(FakeSocket.instances).toHaveLength(2); // the pending retry was cancelled
  });
});
