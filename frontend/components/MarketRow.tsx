"use client";

import Link from "next/link";
import { memo } from "react";

import { useNow } from "@/hooks/useNow";
import { cx } from "@/lib/cx";
import { formatAge, formatBasis, formatCompact, formatPercent, formatPrice } from "@/lib/format";
import { buildRow, marketStore, quoteVolume, useMarket, type MarketFilter } from "@/store/marketStore";
import { quoteKey } from "@/types/market";

import { FlashPrice } from "./FlashPrice";
import styles from "./MarketTable.module.css";

/** Only this cell re-renders on the clock's 1 s tick. */
function AgeCell({ updated }: { updated: number }) {
  const now = useNow();
  return (
    <div role="cell" className={cx(styles.cell, styles.num, styles.age, styles.optMd)}>
      {formatAge(now && updated ? now - updated : null)}
    </div>
  );
}

function signClass(value: number | null | undefined): string | undefined {
  if (!value) return "";
  return value > 0 ? styles.pos : styles.neg;
}

interface MarketRowProps {
  symbol: string;
  /** offset from the top of the list (px), from the virtualizer */
  start: number;
  /** 1-based row number for assistive technology (the header is row 1) */
  rowIndex: number;
  statsMarket: MarketFilter;
}

/**
 * One symbol: SPOT and FUTURES side by side. It subscribes to its own two quotes only, and is
 * memoised, so a price change re-renders this row and nothing else.
 */
export const MarketRow = memo(function MarketRow({ symbol, start, rowIndex, statsMarket }: MarketRowProps) {
  const spot = useMarket((s) => s.quotes.get(quoteKey(symbol, "SPOT")));
  const futures = useMarket((s) => s.quotes.get(quoteKey(symbol, "FUTURES")));
  const favourite = useMarket((s) => s.favourites[symbol] === true);
  const row = buildRow(symbol, spot, futures, statsMarket);
  const detailMarket = futures ? "FUTURES" : "SPOT";
  const stats = row.stats;
  return (
    <div
      role="row"
      aria-rowindex={rowIndex}
      className={styles.row}
      style={{ transform: `translateY(${start}px)` }}
      data-symbol={symbol}
    >
      <div role="cell" className={cx(styles.cell, styles.fav)}>
        <button
          type="button"
          className={styles.star}
          aria-pressed={favourite}
          aria-label={favourite ? `Unpin ${symbol}` : `Pin ${symbol} to the top`}
          onClick={() => marketStore.getState().toggleFavourite(symbol)}
        >
          {favourite ? "★" : "☆"}
        </button>
      </div>
      <div role="cell" className={cx(styles.cell, styles.symbol)}>
        <Link href={`/detail/?symbol=${encodeURIComponent(symbol)}&market=${detailMarket}`} prefetch={false}>
          {symbol}
        </Link>
      </div>
      <div role="cell" className={cx(styles.cell, styles.num)}>
        <FlashPrice quote={spot} testId="spot-price" />
      </div>
      <div role="cell" className={cx(styles.cell, styles.num)}>
        <FlashPrice quote={futures} testId="futures-price" />
      </div>
      <div role="cell" className={cx(styles.cell, styles.num, styles.optMd, signClass(row.basis))}>
        {formatBasis(row.basis)}
      </div>
      <div role="cell" className={cx(styles.cell, styles.num, signClass(stats?.change24h))}>
        {formatPercent(stats?.change24h)}
      </div>
      <div role="cell" className={cx(styles.cell, styles.num, styles.optLg)}>
        {formatPrice(stats?.high24h)}
      </div>
      <div role="cell" className={cx(styles.cell, styles.num, styles.optLg)}>
        {formatPrice(stats?.low24h)}
      </div>
      <div role="cell" className={cx(styles.cell, styles.num, styles.optMd)}>
        {formatCompact(quoteVolume(stats))}
      </div>
      <AgeCell updated={row.updated} />
    </div>
  );
});
