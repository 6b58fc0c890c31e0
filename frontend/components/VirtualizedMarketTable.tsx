"use client";

import { useVirtualizer } from "@tanstack/react-virtual";
import { useMemo, useRef } from "react";
import { useShallow } from "zustand/react/shallow";

import { cx } from "@/lib/cx";
import {
  createRowOrderSelector,
  useMarket,
  type SortColumn,
  type SortDirection,
  type TableView,
} from "@/store/marketStore";

import { MarketRow } from "./MarketRow";
import styles from "./MarketTable.module.css";

export const ROW_HEIGHT_PX = 36;

interface Column {
  id: SortColumn | null;
  label: string;
  title?: string;
  className: string | undefined;
}

const COLUMNS: Column[] = [
  { id: null, label: "★", title: "Favourites (pinned to the top)", className: styles.fav },
  { id: "symbol", label: "Symbol", className: styles.symbol },
  { id: "spot", label: "Spot", title: "SPOT last price", className: styles.num },
  { id: "futures", label: "Futures", title: "USDT perpetual last price", className: styles.num },
  { id: "basis", label: "Basis", title: "(futures − spot) / spot", className: cx(styles.num, styles.optMd) },
  { id: "change", label: "24h", title: "24 h change", className: styles.num },
  { id: "high", label: "High", title: "24 h high", className: cx(styles.num, styles.optLg) },
  { id: "low", label: "Low", title: "24 h low", className: cx(styles.num, styles.optLg) },
  { id: "volume", label: "Volume", title: "24 h volume in USDT (turnover)", className: cx(styles.num, styles.optMd) },
  { id: "age", label: "Age", title: "Time since the last update", className: cx(styles.num, styles.optMd) },
];

/** The direction a column sorts in when first clicked: names A→Z, age youngest first, numbers high→low. */
export function defaultDirection(column: SortColumn): SortDirection {
  return column === "symbol" || column === "age" ? "asc" : "desc";
}

interface Props {
  view: TableView;
  onSort: (column: SortColumn, direction: SortDirection) => void;
}

/**
 * Every symbol, virtualised: only the rows in view (plus a few) are in the DOM. The table itself
 * re-renders only when the row ORDER changes; prices update inside the rows.
 */
export function VirtualizedMarketTable({ view, onSort }: Props) {
  const selectOrder = useMemo(createRowOrderSelector, []);
  const order = useMarket(useShallow((s) => selectOrder(s, view)));
  const total = useMarket((s) => s.symbols.length);
  const status = useMarket((s) => s.connection.status);
  const scrollRef = useRef<HTMLDivElement>(null);
  // eslint-disable-next-line react-hooks/incompatible-library -- TanStack Virtual is used as documented
  const virtualizer = useVirtualizer({
    count: order.length,
    getScrollElement: () => scrollRef.current,
    estimateSize: () => ROW_HEIGHT_PX,
    overscan: 12,
    getItemKey: (index) => order[index] ?? index,
  });

  const sortBy = (column: SortColumn) => {
    if (column === view.sort) onSort(column, view.direction === "asc" ? "desc" : "asc");
    else onSort(column, defaultDirection(column));
  };

  return (
    <div
      ref={scrollRef}
      className={styles.scroller}
      role="table"
      aria-label="Market quotes"
      aria-rowcount={order.length + 1}
      data-testid="market-table"
      data-rows={order.length}
    >
      <div role="rowgroup" className={styles.head}>
        <div role="row" aria-rowindex={1} className={styles.headRow}>
          {COLUMNS.map((col) => {
            const sorted = col.id !== null && col.id === view.sort;
            return (
              <div
                key={col.label}
                role="columnheader"
                className={cx(styles.cell, col.className)}
                aria-sort={sorted ? (view.direction === "asc" ? "ascending" : "descending") : undefined}
                title={col.title}
              >
                {col.id === null ? (
                  <span aria-hidden="true">{col.label}</span>
                ) : (
                  <button
                    type="button"
                    className={styles.sortButton}
                    onClick={() => sortBy(col.id as SortColumn)}
                    data-column={col.id}
                  >
                    {col.label}
                    <span className={styles.sortMark} aria-hidden="true">
                      {sorted ? (view.direction === "asc" ? "▲" : "▼") : ""}
                    </span>
                  </button>
                )}
              </div>
            );
          })}
        </div>
      </div>
      <div role="rowgroup" className={styles.body} style={{ height: virtualizer.getTotalSize() }}>
        {virtualizer.getVirtualItems().map((item) => {
          const symbol = order[item.index];
          if (symbol === undefined) return null;
          return (
            <MarketRow
              key={symbol}
              symbol={symbol}
              start={item.start}
              rowIndex={item.index + 2}
              statsMarket={view.market}
            />
          );
        })}
      </div>
      {order.length === 0 && (
        <div className={styles.empty} data-testid="empty">
          {total === 0
            ? status === "open"
              ? "Connected — waiting for the first quotes…"
              : "Waiting for the hub…"
            : "No symbol matches the search and market filter."}
        </div>
      )}
    </div>
  );
}
