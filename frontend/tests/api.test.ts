import { afterEach, describe, expect, it, vi } from "vitest";

import { apiBase, ohlcUrl, toCandles, wsUrl } from "@/lib/api";

const T = Date.UTC(2026, 7, 10, 12, 0, 0);

describe("base URL", () => {
  afterEach(() => {
    vi.unstubAllEnvs();
  });

  it("comes from NEXT_PUBLIC_SOW_API, without a trailing slash", () => {
    vi.stubEnv("NEXT_PUBLIC_SOW_API", "http://hub.example:8080/");
    expect(apiBase()).toBe("http://hub.example:8080");
    expect(wsUrl()).toBe("ws://hub.example:8080/ws");
  });

  it("maps https to wss", () => {
    expect(wsUrl("https://hub.example")).toBe("wss://hub.example/ws");
  });

  it("builds the OHLC URL with an interval and a 300-candle range", () => {
    const url = new URL(ohlcUrl("BTCUSDT", "FUTURES", "5m", T, "http://hub"));
    expect(url.pathname).toBe("/api/prices/BTCUSDT/FUTURES/ohlc");
    expect(url.searchParams.get("interval")).toBe("5m");
    expect(url.searchParams.get("to")).toBe("2026-08-10T12:00:00.000Z");
    expect(url.searchParams.get("from")).toBe("2026-08-09T11:00:00.000Z");
  });
});

describe("toCandles", () => {
  const expected = [
    { time: T / 1000 - 60, open: 1, high: 3, low: 0.5, close: 2, ticks: 7 },
    { time: T / 1000, open: 2, high: 2.5, low: 1.5, close: 2.2, ticks: null },
  ];

  it("reads rows as objects with ISO timestamps, oldest first", () => {
    const body = [
      { timestamp: "2026-08-10T12:00:00Z", open: 2, high: 2.5, low: 1.5, close: 2.2 },
      { timestamp: "2026-08-10T11:59:00.000000Z", open: 1, high: 3, low: 0.5, close: 2, ticks: 7 },
    ];
    expect(toCandles(body)).toEqual(expected);
  });

  it("reads wrapped rows, arrays in column order and epoch times", () => {
    expect(
      toCandles({
        columns: ["timestamp", "open", "high", "low", "close", "ticks"],
        rows: [
          [(T - 60_000) * 1000, 1, 3, 0.5, 2, 7],
          [T, 2, 2.5, 1.5, 2.2, null],
        ],
      }),
    ).toEqual(expected);
    expect(toCandles({ candles: [{ time: T / 1000, open: "2", high: "2.5", low: "1.5", close: "2.2" }] })).toEqual([expected[1]]);
  });

  it("drops unusable rows and duplicate times (the later wins)", () => {
    expect(
      toCandles([
        { timestamp: "garbage", open: 1, high: 1, low: 1, close: 1 },
        { timestamp: T, open: null, high: 1, low: 1, close: 1 },
        { timestamp: T, open: 9, high: 9, low: 9, close: 9 },
        { timestamp: T, open: 2, high: 2.5, low: 1.5, close: 2.2 },
        "nonsense",
      ]),
    ).toEqual([expected[1]]);
    expect(toCandles(null)).toEqual([]);
    expect(toCandles({ detail: "nope" })).toEqual([]);
  });
});
