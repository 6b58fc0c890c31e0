import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";

import {
  createMarketStore,
  createRowOrderSelector,
  DEFAULT_VIEW,
  FAVOURITES_KEY,
  selectRowOrder,
  symbolRow,
  type TableView,
} from "@/store/marketStore";

import { MemoryStorage, quote } from "./fakes";

const view = (over: Partial<TableView> = {}): TableView => ({ ...DEFAULT_VIEW, ...over });

describe("applyBatch", () => {
  it("applies a whole batch in ONE state update", () => {
    const store = createMarketStore();
    const listener = vi.fn();
    store.subscribe(listener);
    const batch = Array.from({ length: 500 }, (_, i) => quote(`S${i}USDT`, i % 2 ? "SPOT" : "FUTURES", i + 1));
    store.getState().applyBatch(batch);
    expect(listener).toHaveBeenCalledTimes(1);
    expect(store.getState().quotes.size).toBe(500);
    expect(store.stats.batches).toBe(1);
  });

  it("keys quotes by symbol and market", () => {
    const store = createMarketStore();
    store.getState().applyBatch([quote("BTCUSDT", "SPOT", 100), quote("BTCUSDT", "FUTURES", 101)]);
    const { quotes, symbols } = store.getState();
    expect(quotes.get("BTCUSDT:SPOT")?.price).toBe(100);
    expect(quotes.get("BTCUSDT:FUTURES")?.price).toBe(101);
    expect(symbols).toEqual(["BTCUSDT"]);
  });

  it("conflates: the newest quote per symbol and market wins, older ones are ignored", () => {
    const store = createMarketStore();
    const first = quote("ETHUSDT", "SPOT", 10, { ts: 1000, seq: 1 });
    const second = quote("ETHUSDT", "SPOT", 11, { ts: 2000, seq: 2 });
    const late = quote("ETHUSDT", "SPOT", 9, { ts: 1500, seq: 3 }); // arrives after, but older
    store.getState().applyBatch([first, second, late]);
    expect(store.getState().quotes.get("ETHUSDT:SPOT")).toMatchObject({ price: 11, seq: 2 });

    store.getState().applyBatch([late]);
    expect(store.getState().quotes.get("ETHUSDT:SPOT")).toMatchObject({ price: 11, seq: 2 });
  });

  it("does not notify when nothing changed (a repeated snapshot)", () => {
    const store = createMarketStore();
    const q = quote("SOLUSDT", "SPOT", 150);
    store.getState().applyBatch([q]);
    const before = store.getState().quotes;
    const listener = vi.fn();
    store.subscribe(listener);
    store.getState().applyBatch([q, { ...q }]);
    expect(listener).not.toHaveBeenCalled();
    expect(store.getState().quotes).toBe(before);
  });

  it("keeps untouched quotes (and the symbol list) as the same objects", () => {
    const store = createMarketStore();
    store.getState().applyBatch([quote("AUSDT", "SPOT", 1), quote("BUSDT", "SPOT", 2)]);
    const { quotes, symbols } = store.getState();
    store.getState().applyBatch([quote("AUSDT", "SPOT", 1.5)]);
    const next = store.getState();
    expect(next.quotes.get("BUSDT:SPOT")).toBe(quotes.get("BUSDT:SPOT"));
    expect(next.quotes.get("AUSDT:SPOT")).not.toBe(quotes.get("AUSDT:SPOT"));
    expect(next.symbols).toBe(symbols);
  });

  it("records the direction of each price change for the flash", () => {
    const store = createMarketStore();
    const apply = (price: number) => {
      store.getState().applyBatch([quote("XUSDT", "SPOT", price)]);
      return store.getState().quotes.get("XUSDT:SPOT")?.tick;
    };
    expect(apply(10)).toBe(0);
    expect(apply(11)).toBe(1);
    expect(apply(10.5)).toBe(-1);
    expect(apply(10.5)).toBe(0);
  });

  it("keeps the symbol list sorted as new symbols appear", () => {
    const store = createMarketStore();
    store.getState().applyBatch([quote("ZUSDT", "SPOT", 1), quote("MUSDT", "FUTURES", 1)]);
    store.getState().applyBatch([quote("AUSDT", "SPOT", 1), quote("MUSDT", "SPOT", 1)]);
    expect(store.getState().symbols).toEqual(["AUSDT", "MUSDT", "ZUSDT"]);
  });

  it("skips malformed quotes instead of failing the batch", () => {
    const store = createMarketStore();
    const bad = [{ symbol: "", market: "SPOT", price: 1, ts: 1 }, { symbol: "A", market: "OPTIONS", price: 1, ts: 1 }, null];
    store.getState().applyBatch([...(bad as never[]), quote("OKUSDT", "SPOT", 1)]);
    expect(store.getState().symbols).toEqual(["OKUSDT"]);
  });

  it("applies 1,000 updates/s worth of batches onto 2,000 streams (timings printed, not asserted)", () => {
    const all = Array.from({ length: 1000 }, (_, i) => [quote(`S${i}USDT`, "SPOT", 1 + i), quote(`S${i}USDT`, "FUTURES", 1 + i)]).flat();
    for (const size of [100, 1000]) {
      const store = createMarketStore();
      store.getState().applyBatch(all);
      for (let round = 1; round <= 200; round++) {
        const start = (round * size) % all.length;
        store.getState().applyBatch(all.slice(start, start + size).map((q) => ({ ...q, price: q.price + round, ts: q.ts + round })));
      }
      const ms = [...store.stats.recentMs.slice(1)].sort((a, b) => a - b);
      const at = (p: number) => ms[Math.floor(ms.length * p)]?.toFixed(3);
      console.info(`applyBatch, ${size} quotes onto 2,000 streams (Node, no subscribers): p50 ${at(0.5)} ms, p95 ${at(0.95)} ms`);
      expect(store.getState().quotes.size).toBe(2000);
      expect(store.stats.batches).toBe(201);
    }
  });
});

describe("selectRowOrder (derived, never stored)", () => {
  function loaded() {
    const store = createMarketStore();
    store.getState().applyBatch([
      quote("BTCUSDT", "SPOT", 60_000, { change24h: 2, turnover: 5e9 }),
      quote("BTCUSDT", "FUTURES", 60_060, { change24h: 2.1, turnover: 9e9 }),
      quote("ETHUSDT", "SPOT", 3000, { change24h: -1, turnover: 2e9 }),
      quote("ETHUSDT", "FUTURES", 2997, { change24h: -1.2, turnover: 3e9 }),
      quote("DOGEUSDT", "SPOT", 0.1, { change24h: 5, turnover: null, volume: 1e6 }),
      quote("PERPONLYUSDT", "FUTURES", 2, { change24h: null, turnover: 1 }),
    ]);
    return store;
  }

  it("sorts by symbol by default", () => {
    expect(selectRowOrder(loaded().getState(), view())).toEqual(["BTCUSDT", "DOGEUSDT", "ETHUSDT", "PERPONLYUSDT"]);
  });

  it("sorts by a column in either direction, empty values last both ways", () => {
    const state = loaded().getState();
    expect(selectRowOrder(state, view({ sort: "spot", direction: "desc" }))).toEqual(["BTCUSDT", "ETHUSDT", "DOGEUSDT", "PERPONLYUSDT"]);
    expect(selectRowOrder(state, view({ sort: "spot", direction: "asc" }))).toEqual(["DOGEUSDT", "ETHUSDT", "BTCUSDT", "PERPONLYUSDT"]);
    expect(selectRowOrder(state, view({ sort: "change", direction: "desc" }))).toEqual(["DOGEUSDT", "BTCUSDT", "ETHUSDT", "PERPONLYUSDT"]);
    expect(selectRowOrder(state, view({ sort: "basis", direction: "asc" }))).toEqual(["ETHUSDT", "BTCUSDT", "DOGEUSDT", "PERPONLYUSDT"]);
  });

  it("sorts volume in USDT (turnover, else volume × price)", () => {
    const order = selectRowOrder(loaded().getState(), view({ sort: "volume", direction: "desc" }));
    expect(order).toEqual(["BTCUSDT", "ETHUSDT", "DOGEUSDT", "PERPONLYUSDT"]);
  });

  it("filters by a symbol substring, in any case", () => {
    const state = loaded().getState();
    expect(selectRowOrder(state, view({ search: "  eth " }))).toEqual(["ETHUSDT"]);
    expect(selectRowOrder(state, view({ search: "usdt" }))).toHaveLength(4);
    expect(selectRowOrder(state, view({ search: "nope" }))).toEqual([]);
  });

  it("filters by market", () => {
    const state = loaded().getState();
    expect(selectRowOrder(state, view({ market: "SPOT" }))).toEqual(["BTCUSDT", "DOGEUSDT", "ETHUSDT"]);
    expect(selectRowOrder(state, view({ market: "FUTURES" }))).toEqual(["BTCUSDT", "ETHUSDT", "PERPONLYUSDT"]);
  });

  it("shows the filtered market's 24 h figures (spot, else futures, when unfiltered)", () => {
    const { quotes } = loaded().getState();
    expect(symbolRow(quotes, "BTCUSDT").stats?.market).toBe("SPOT");
    expect(symbolRow(quotes, "BTCUSDT", "FUTURES").stats?.market).toBe("FUTURES");
    expect(symbolRow(quotes, "PERPONLYUSDT").stats?.market).toBe("FUTURES");
    expect(symbolRow(quotes, "BTCUSDT").basis).toBeCloseTo(0.1);
    expect(symbolRow(quotes, "DOGEUSDT").basis).toBeNull();
  });

  it("pins favourites to the top, sorted among themselves", () => {
    const store = loaded();
    store.getState().toggleFavourite("ETHUSDT");
    store.getState().toggleFavourite("DOGEUSDT");
    const order = selectRowOrder(store.getState(), view({ sort: "spot", direction: "desc" }));
    expect(order).toEqual(["ETHUSDT", "DOGEUSDT", "BTCUSDT", "PERPONLYUSDT"]);
    // a favourite that the search excludes stays hidden
    expect(selectRowOrder(store.getState(), view({ search: "BTC" }))).toEqual(["BTCUSDT"]);
  });
});

describe("favourites", () => {
  beforeEach(() => {
    vi.stubGlobal("localStorage", new MemoryStorage());
  });
  afterEach(() => {
    vi.unstubAllGlobals();
  });

  it("are kept in localStorage and read back by a new page", () => {
    const store = createMarketStore();
    store.getState().toggleFavourite("BTCUSDT");
    store.getState().toggleFavourite("ETHUSDT");
    store.getState().toggleFavourite("BTCUSDT");
    expect(JSON.parse(localStorage.getItem(FAVOURITES_KEY) ?? "null")).toEqual(["ETHUSDT"]);

    const reloaded = createMarketStore();
    reloaded.getState().loadFavourites();
    expect(reloaded.getState().favourites).toEqual({ ETHUSDT: true });
  });

  it("survive garbage in storage", () => {
    localStorage.setItem(FAVOURITES_KEY, "{not json");
    const store = createMarketStore();
    store.getState().loadFavourites();
    expect(store.getState().favourites).toEqual({});
  });
});

describe("createRowOrderSelector", () => {
  it("recomputes only when the order can have changed", () => {
    const store = createMarketStore();
    store.getState().applyBatch([quote("BUSDT", "SPOT", 1), quote("AUSDT", "SPOT", 2)]);
    const select = createRowOrderSelector();
    const bySymbol = view();
    const first = select(store.getState(), bySymbol);
    expect(first).toEqual(["AUSDT", "BUSDT"]);

    store.getState().applyBatch([quote("BUSDT", "SPOT", 3)]); // a price moved
    expect(select(store.getState(), bySymbol)).toBe(first); // same array: the table skips a render

    const bySpot = view({ sort: "spot", direction: "desc" });
    expect(select(store.getState(), bySpot)).toEqual(["BUSDT", "AUSDT"]);
    store.getState().applyBatch([quote("AUSDT", "SPOT", 4)]);
    expect(select(store.getState(), bySpot)).toEqual(["AUSDT", "BUSDT"]);

    store.getState().applyBatch([quote("AUSDT", "FUTURES", 4)]); // a new stream
    expect(select(store.getState(), view({ market: "FUTURES" }))).toEqual(["AUSDT"]);
  });
});
