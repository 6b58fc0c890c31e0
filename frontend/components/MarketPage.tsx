"use client";

import { useEffect, useState } from "react";

import { useWebSocket } from "@/hooks/useWebSocket";
import {
  DEFAULT_VIEW,
  marketStore,
  useMarket,
  type MarketFilter,
  type TableView,
} from "@/store/marketStore";

import { ConnectionIndicator } from "./ConnectionIndicator";
import styles from "./MarketPage.module.css";
import { VirtualizedMarketTable } from "./VirtualizedMarketTable";

const FILTERS: { value: MarketFilter; label: string }[] = [
  { value: "ALL", label: "All" },
  { value: "SPOT", label: "Spot" },
  { value: "FUTURES", label: "Futures" },
];

declare global {
  interface Window {
    /** The page's store, for the browser test and for poking at in the devtools console. */
    __sow?: { store: typeof marketStore };
  }
}

/** `/market`: every symbol's live SPOT and FUTURES quotes. */
export function MarketPage() {
  useWebSocket();
  const [view, setView] = useState<TableView>(DEFAULT_VIEW);
  const symbolCount = useMarket((s) => s.symbols.length);

  useEffect(() => {
    marketStore.getState().loadFavourites();
    window.__sow = { store: marketStore };
  }, []);

  return (
    <main className={styles.page}>
      <header className={styles.header}>
        <h1 className={styles.title}>
          sow <span className={styles.dim}>· market</span>
        </h1>
        <span className={styles.count} data-testid="symbol-count">
          {symbolCount.toLocaleString("en-US")} symbols
        </span>
        <ConnectionIndicator />
      </header>
      <div className={styles.toolbar}>
        <input
          type="search"
          className={styles.search}
          placeholder="Search symbol…"
          aria-label="Search symbol"
          value={view.search}
          onChange={(e) => setView((v) => ({ ...v, search: e.target.value }))}
          autoComplete="off"
          spellCheck={false}
          data-testid="search"
        />
        <div className={styles.segmented} role="group" aria-label="Market">
          {FILTERS.map((f) => (
            <button
              key={f.value}
              type="button"
              aria-pressed={view.market === f.value}
              onClick={() => setView((v) => ({ ...v, market: f.value }))}
              data-market={f.value}
            >
              {f.label}
            </button>
          ))}
        </div>
      </div>
      <div className={styles.tableArea}>
        <VirtualizedMarketTable
          view={view}
          onSort={(sort, direction) => setView((v) => ({ ...v, sort, direction }))}
        />
      </div>
    </main>
  );
}
