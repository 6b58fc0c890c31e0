// @vitest-environment jsdom
import { act, renderHook } from "@testing-library/react";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import { useWebSocket } from "@/hooks/useWebSocket";
import { createMarketStore } from "@/store/marketStore";

import { createFakeSocket, FakeSocket, quote } from "./fakes";

/** The longest first retry delay with the default backoff (500 ms, up to 50 % jitter). */
const DEFAULT_MAX_FIRST_DELAY_MS = 500;

beforeEach(() => {
  FakeSocket.reset();
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("useWebSocket", () => {
  it("feeds the store once per animation frame and reconnects after a drop", () => {
    const store = createMarketStore();
    const { unmount, rerender } = renderHook(
      ({ symbols }: { symbols: string[] }) =>
        useWebSocket({ symbols, url: "ws://hub.test/ws", store, createSocket: createFakeSocket }),
      { initialProps: { symbols: ["*"] } },
    );
    expect(store.getState().connection.status).toBe("connecting");
    act(() => FakeSocket.last.open());
    expect(store.getState().connection.status).toBe("open");
    expect(FakeSocket.last.sent).toEqual([{ type: "subscribe", symbols: ["*"] }]);

    const updates = vi.fn();
    store.subscribe(updates);
    act(() => {
      FakeSocket.last.receive({ type: "snapshot", quotes: [quote("BTCUSDT", "SPOT", 100), quote("ETHUSDT", "SPOT", 10)] });
      FakeSocket.last.receive({ type: "quotes", quotes: [quote("BTCUSDT", "SPOT", 101)] });
    });
    expect(store.getState().quotes.size).toBe(0);
    act(() => vi.advanceTimersByTime(20)); // one animation frame
    expect(updates).toHaveBeenCalledTimes(1);
    expect(store.getState().quotes.get("BTCUSDT:SPOT")?.price).toBe(101);

    // the server goes away: reconnect with backoff, subscribe again
    act(() => FakeSocket.last.drop(1006));
    expect(store.getState().connection).toMatchObject({ status: "reconnecting", attempt: 1 });
    act(() => vi.advanceTimersByTime(DEFAULT_MAX_FIRST_DELAY_MS));
    expect(FakeSocket.instances).toHaveLength(2);
    act(() => FakeSocket.last.open());
    expect(FakeSocket.last.sent).toEqual([{ type: "subscribe", symbols: ["*"] }]);

    // a new symbol list changes the subscription without a new socket
    rerender({ symbols: ["SOLUSDT"] });
    expect(FakeSocket.instances).toHaveLength(2);
    expect(FakeSocket.last.sent.slice(1)).toEqual([
      { type: "unsubscribe", symbols: ["*"] },
      { type: "subscribe", symbols: ["SOLUSDT"] },
    ]);

    unmount();
    expect(FakeSocket.last.closedWith).toBe(1000);
    expect(store.getState().connection.status).toBe("closed");
    act(() => vi.advanceTimersByTime(120_000));
    expect(FakeSocket.instances).toHaveLength(2);
  });

  it("retries at once when the browser comes back online", () => {
    const store = createMarketStore();
    renderHook(() => useWebSocket({ url: "ws://hub.test/ws", store, createSocket: createFakeSocket }));
    act(() => FakeSocket.last.drop(1006));
    expect(FakeSocket.instances).toHaveLength(1);
    act(() => {
      window.dispatchEvent(new Event("online"));
    });
    expect(FakeSocket.instances).toHaveLength(2);
  });
});
