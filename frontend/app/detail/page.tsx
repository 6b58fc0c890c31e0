"use client";

import Link from "next/link";
import { useSearchParams } from "next/navigation";
import { Suspense } from "react";

import { DetailView } from "@/components/DetailView";
import styles from "@/components/DetailView.module.css";
import { OHLC_INTERVALS, type Market, type OhlcInterval } from "@/types/market";

const SYMBOL_RE = /^[A-Z0-9]{2,32}$/;

/** Reads `?symbol=BTCUSDT&market=FUTURES&interval=1m` (query parameters keep the export static). */
function Detail() {
  const params = useSearchParams();
  const symbol = (params.get("symbol") ?? "").trim().toUpperCase();
  const marketParam = (params.get("market") ?? "FUTURES").trim().toUpperCase();
  const intervalParam = params.get("interval") ?? "1m";
  const interval: OhlcInterval = (OHLC_INTERVALS as readonly string[]).includes(intervalParam)
    ? (intervalParam as OhlcInterval)
    : "1m";
  if (!SYMBOL_RE.test(symbol) || (marketParam !== "SPOT" && marketParam !== "FUTURES")) {
    return (
      <main className={styles.page}>
        <p className={styles.error} role="alert">
          {SYMBOL_RE.test(symbol)
            ? `Unknown market “${marketParam}”: choose SPOT or FUTURES.`
            : "Which symbol? Open this page from the market table, e.g. ?symbol=BTCUSDT&market=FUTURES."}{" "}
          <Link href="/">Back to the market</Link>
        </p>
      </main>
    );
  }
  const market = marketParam as Market;
  return <DetailView key={`${symbol}:${market}`} symbol={symbol} market={market} initialInterval={interval} />;
}

export default function DetailPage() {
  return (
    <Suspense fallback={null}>
      <Detail />
    </Suspense>
  );
}
