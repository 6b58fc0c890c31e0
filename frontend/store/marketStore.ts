/**
 * The dashboard's state: the latest quote per symbol and market, the connection status and the
 * user's favourites (Zustand).
 *
 * Performance rules (STYLE.md, Frontend):
 * - `applyBatch` takes everything that arrived during one animation frame and applies it in ONE
 *   `set()`, so React renders at most once per frame however many quotes arrive;
 * - rows select their own slice (`s.quotes.get(key)`), so one price change re-renders one row;
 * - sorting and filtering are derived (`selectRowOrder`), never stored.
 */
import { useStore } from "zustand";
import { createStore, type StoreApi } from "zustand/vanilla";

import {
  MARKETS,
  quoteKey,
  type ConnectionStatus,
  type LiveQuote,
  type Market,
  type Quote,
  type QuoteKey,
  type Tick,
} from "@/types/market";

export const FAVOURITES_KEY = "sow.favourites";

export interface ConnectionInfo {
  status: ConnectionStatus;
  /** reconnect attempt (0 while connected) */
  attempt: number;
  /** when the next attempt starts (ms since the epoch), while reconnecting */
  retryAt: number | null;
  /** last error the socket or the server reported */
  error: string | null;
}

export interface MarketState {
  /** a new Map on every change (copying a Map is ~5× cheaper than copying an object) */
  quotes: ReadonlyMap<QuoteKey, LiveQuote>;
  /** every symbol seen, sorted; a new array only when a new symbol appears */
  symbols: readonly string[];
  connection: ConnectionInfo;
  favourites: Readonly<Record<string, true>>;
  applyBatch: (quotes: readonly Quote[]) => void;
  setConnection: (info: Partial<ConnectionInfo>) => void;
  toggleFavourite: (symbol: string) => void;
  loadFavourites: () => void;
  clear: () => void;
}

export type MarketStore = StoreApi<MarketState>;

/** Timings of `applyBatch` (ms), kept outside the state so reading them never re-renders. */
export interface ApplyStats {
  batches: number;
  quotes: number;
  totalMs: number;
  maxMs: number;
  /** the last 512 batch durations, for percentiles (the whole call, subscribers included) */
  recentMs: number[];
  /** the same batches' time to build the new state, before subscribers are notified */
  recentBuildMs: number[];
}

function newStats(): ApplyStats {
  return { batches: 0, quotes: 0, totalMs: 0, maxMs: 0, recentMs: [], recentBuildMs: [] };
}

const isMarket = (value: unknown): value is Market => MARKETS.includes(value as Market);

/** Cheap shape check: enough to key, order and show a quote. */
function isQuote(q: unknown): q is Quote {
  if (!q || typeof q !== "object") return false;
  const r = q as Record<string, unknown>;
  return (
    typeof r.symbol === "string" &&
    r.symbol !== "" &&
    isMarket(r.market) &&
    typeof r.price === "number" &&
    typeof r.ts === "number"
  );
}

/** True when `next` should not replace `current`: older, or the very same update again. */
function isStale(next: Quote, current: LiveQuote): boolean {
  if (next.ts < current.ts) return true;
  return next.ts === current.ts && next.seq === current.seq && next.price === current.price;
}

function tickOf(next: Quote, current: LiveQuote | undefined): Tick {
  if (!current || next.price === current.price) return 0;
  return next.price > current.price ? 1 : -1;
}

function readFavourites(): Record<string, true> {
  try {
    const raw = globalThis.localStorage?.getItem(FAVOURITES_KEY);
    const list: unknown = raw ? JSON.parse(raw) : [];
    if (!Array.isArray(list)) return {};
    return Object.fromEntries(
      list.filter((s): s is string => typeof s === "string").map((s) => [s, true] as const),
    );
  } catch {
    return {};
  }
}

function writeFavourites(favourites: Record<string, true>): void {
  try {
    globalThis.localStorage?.setItem(FAVOURITES_KEY, JSON.stringify(Object.keys(favourites).sort()));
  } catch {
    // storage full or disabled (private mode): favourites last for this page only
  }
}

const INITIAL_CONNECTION: ConnectionInfo = { status: "idle", attempt: 0, retryAt: null, error: null };

export function createMarketStore(): MarketStore & { stats: ApplyStats } {
  const stats = newStats();
  const store = createStore<MarketState>()((set, get) => ({
    quotes: new Map(),
    symbols: [],
    connection: INITIAL_CONNECTION,
    favourites: {},

    applyBatch(batch) {
      const started = performance.now();
      const prev = get().quotes;
      let next: Map<QuoteKey, LiveQuote> | null = null;
      let added: string[] | null = null;
      let known: Set<string> | null = null;
      for (const q of batch) {
        if (!isQuote(q)) continue;
        const key = quoteKey(q.symbol, q.market);
        const current = (next ?? prev).get(key);
        if (current && isStale(q, current)) continue;
        next ??= new Map(prev);
        next.set(key, { ...q, tick: tickOf(q, current) });
        if (!current) {
          known ??= new Set(get().symbols);
          if (!known.has(q.symbol)) {
            known.add(q.symbol);
            (added ??= []).push(q.symbol);
          }
        }
      }
      const built = performance.now();
      if (next) {
        const symbols = added ? [...get().symbols, ...added].sort() : get().symbols;
        set({ quotes: next, symbols });
      }
      const ms = performance.now() - started;
      stats.recentBuildMs.push(built - started);
      if (stats.recentBuildMs.length > 512) stats.recentBuildMs.shift();
      stats.batches += 1;
      stats.quotes += batch.length;
      stats.totalMs += ms;
      stats.maxMs = Math.max(stats.maxMs, ms);
      stats.recentMs.push(ms);
      if (stats.recentMs.length > 512) stats.recentMs.shift();
    },

    setConnection(info) {
      set({ connection: { ...get().connection, ...info } });
    },

    toggleFavourite(symbol) {
      const favourites = { ...get().favourites };
      if (favourites[symbol]) delete favourites[symbol];
      else favourites[symbol] = true;
      writeFavourites(favourites);
      set({ favourites });
    },

    loadFavourites() {
      set({ favourites: readFavourites() });
    },

    clear() {
      set({ quotes: new Map(), symbols: [] });
    },
  }));
  return Object.assign(store, { stats });
}

/** The page's store (one per browser tab). */
export const marketStore = createMarketStore();

export function useMarket<T>(selector: (state: MarketState) => T): T {
  return useStore(marketStore, selector);
}

// --- derived views -------------------------------------------------------------------------

export type MarketFilter = "ALL" | Market;
export type SortColumn =
  | "symbol"
  | "spot"
  | "futures"
  | "basis"
  | "change"
  | "high"
  | "low"
  | "volume"
  | "age";
export type SortDirection = "asc" | "desc";

export interface TableView {
  search: string;
  market: MarketFilter;
  sort: SortColumn;
  direction: SortDirection;
}

export const DEFAULT_VIEW: TableView = { search: "", market: "ALL", sort: "symbol", direction: "asc" };

/** A symbol's row as the table shows it (both markets side by side). */
export interface SymbolRow {
  symbol: string;
  spot: LiveQuote | undefined;
  futures: LiveQuote | undefined;
  /** the quote whose 24 h change, high, low and volume the row shows */
  stats: LiveQuote | undefined;
  /** (futures − spot) / spot, in percent */
  basis: number | null;
  /** newest exchange time of either market (ms) */
  updated: number;
}

/**
 * Which market's 24 h figures a row shows: the filtered market, else spot (the underlying), else
 * futures for symbols that trade only as perpetuals.
 */
export function buildRow(
  symbol: string,
  spot: LiveQuote | undefined,
  futures: LiveQuote | undefined,
  market: MarketFilter = "ALL",
): SymbolRow {
  const stats = market === "FUTURES" ? futures : market === "SPOT" ? spot : (spot ?? futures);
  const basis = spot && futures && spot.price ? ((futures.price - spot.price) / spot.price) * 100 : null;
  return { symbol, spot, futures, stats, basis, updated: Math.max(spot?.ts ?? 0, futures?.ts ?? 0) };
}

export function symbolRow(
  quotes: MarketState["quotes"],
  symbol: string,
  market: MarketFilter = "ALL",
): SymbolRow {
  return buildRow(symbol, quotes.get(quoteKey(symbol, "SPOT")), quotes.get(quoteKey(symbol, "FUTURES")), market);
}

/** 24 h volume in the quote currency (USDT), comparable across symbols. */
export function quoteVolume(q: Quote | undefined): number | null {
  if (!q) return null;
  if (q.turnover !== null && q.turnover !== undefined) return q.turnover;
  return q.volume !== null && q.volume !== undefined ? q.volume * q.price : null;
}

/** The value a row sorts by: a number (or null: sorts last), or the symbol itself. */
function sortValue(
  column: SortColumn,
  symbol: string,
  spot: LiveQuote | undefined,
  futures: LiveQuote | undefined,
  market: MarketFilter,
): number | string | null {
  if (column === "symbol") return symbol;
  if (column === "spot") return spot?.price ?? null;
  if (column === "futures") return futures?.price ?? null;
  if (column === "basis") {
    return spot && futures && spot.price ? ((futures.price - spot.price) / spot.price) * 100 : null;
  }
  if (column === "age") {
    const updated = Math.max(spot?.ts ?? 0, futures?.ts ?? 0);
    return updated ? -updated : null; // youngest first when ascending
  }
  const stats = market === "FUTURES" ? futures : market === "SPOT" ? spot : (spot ?? futures);
  if (column === "change") return stats?.change24h ?? null;
  if (column === "high") return stats?.high24h ?? null;
  if (column === "low") return stats?.low24h ?? null;
  return quoteVolume(stats);
}

/** `[spot key, futures key]` per symbol, built once instead of twice per symbol per frame. */
const streamKeys = new Map<string, readonly [QuoteKey, QuoteKey]>();
function keysOf(symbol: string): readonly [QuoteKey, QuoteKey] {
  let keys = streamKeys.get(symbol);
  if (!keys) {
    keys = [quoteKey(symbol, "SPOT"), quoteKey(symbol, "FUTURES")];
    if (streamKeys.size < 100_000) streamKeys.set(symbol, keys);
  }
  return keys;
}

/**
 * A memoised {@link selectRowOrder} for one table: it recomputes only when something the order
 * depends on changed. Sorted by symbol, the order depends on which streams exist, not on prices,
 * so a price-only batch costs nothing here and the table does not re-render.
 */
export function createRowOrderSelector(): (
  state: Pick<MarketState, "quotes" | "symbols" | "favourites">,
  view: TableView,
) => string[] {
  let last: { deps: unknown[]; order: string[] } | null = null;
  return (state, view) => {
    const byValue = view.sort !== "symbol";
    // streams are only ever added, so the count tells when one appeared
    const deps = [
      byValue ? state.quotes : state.quotes.size,
      state.symbols,
      state.favourites,
      view.search,
      view.market,
      view.sort,
      view.direction,
    ];
    if (last && deps.every((d, i) => Object.is(d, last!.deps[i]))) return last.order;
    last = { deps, order: selectRowOrder(state, view) };
    return last.order;
  };
}

/**
 * The symbols the table shows, in order: favourites first, then the rest, each part filtered by
 * the search text (symbol substring, any case) and the market, and sorted by the view's column
 * (empty values last in either direction, ties by symbol).
 */
export function selectRowOrder(
  state: Pick<MarketState, "quotes" | "symbols" | "favourites">,
  view: TableView,
): string[] {
  const needle = view.search.trim().toUpperCase();
  const { quotes, favourites } = state;
  const entries: { symbol: string; fav: boolean; value: number | string | null }[] = [];
  for (const symbol of state.symbols) {
    if (needle && !symbol.includes(needle)) continue;
    const [spotKey, futuresKey] = keysOf(symbol);
    const spot = quotes.get(spotKey);
    const futures = quotes.get(futuresKey);
    if (view.market === "SPOT" && !spot) continue;
    if (view.market === "FUTURES" && !futures) continue;
    entries.push({
      symbol,
      fav: favourites[symbol] === true,
      value: sortValue(view.sort, symbol, spot, futures, view.market),
    });
  }
  const sign = view.direction === "asc" ? 1 : -1;
  entries.sort((a, b) => {
    if (a.fav !== b.fav) return a.fav ? -1 : 1;
    if (a.value !== b.value) {
      if (a.value === null) return 1;
      if (b.value === null) return -1;
      if (a.value < b.value) return -sign;
      if (a.value > b.value) return sign;
    }
    return a.symbol < b.symbol ? -1 : a.symbol > b.symbol ? 1 : 0;
  });
  return entries.map((e) => e.symbol);
}
