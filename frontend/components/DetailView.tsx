"use client";

import Link from "next/link";
import { useEffect, useState } from "react";

import { useWebSocket } from "@/hooks/useWebSocket";
import { fetchOhlc, intervalSeconds } from "@/lib/api";
import {
  formatCompact,
  formatFunding,
  formatPercent,
  formatPrice,
} from "@/lib/format";
import { marketStore, quoteVolume, useMarket } from "@/store/marketStore";
import {
  OHLC_INTERVALS,
  quoteKey,
  type Candle,
  type LiveQuote,
  type Market,
  type OhlcInterval,
} from "@/types/market";

import { CandlestickChart } from "./CandlestickChart";
import { ConnectionIndicator } from "./ConnectionIndicator";
import styles from "./DetailView.module.css";
import { FlashPrice } from "./FlashPrice";

/** How often the candles are fetched again (the live price moves the newest one in between). */
const REFRESH_MS = 30_000;

/** The last answer of the OHLC endpoint, and which symbol, market and interval it was for. */
interface Loaded {
  key: string;
  interval: OhlcInterval;
  candles: Candle[];
  error: string | null;
}

function Figure({ label, value, className }: { label: string; value: string; className?: string }) {
  return (
    <div className={styles.figure}>
      <dt>{label}</dt>
      <dd className={className}>{value}</dd>
    </div>
  );
}

function LiveFigures({ quote }: { quote: LiveQuote | undefined }) {
  const change = quote?.change24h;
  return (
    <dl className={styles.figures}>
      <Figure
        label="24h"
        value={formatPercent(change)}
        className={change ? (change > 0 ? styles.pos : styles.neg) : undefined}
      />
      <Figure label="High" value={formatPrice(quote?.high24h)} />
      <Figure label="Low" value={formatPrice(quote?.low24h)} />
      <Figure label="Volume (USDT)" value={formatCompact(quoteVolume(quote))} />
      <Figure label="Bid" value={formatPrice(quote?.bid)} />
      <Figure label="Ask" value={formatPrice(quote?.ask)} />
      {quote?.market === "FUTURES" && (
        <>
          <Figure label="Mark" value={formatPrice(quote.mark_price)} />
          <Figure label="Index" value={formatPrice(quote.index_price)} />
          <Figure label="Funding" value={formatFunding(quote.funding_rate)} />
          <Figure label="Open interest" value={formatCompact(quote.open_interest)} />
        </>
      )}
    </dl>
  );
}

/** One symbol on one market: the live quote and a candlestick chart with an interval picker. */
export function DetailView({ symbol, market, initialInterval }: { symbol: string; market: Market; initialInterval: OhlcInterval }) {
  const [interval, pickInterval] = useState<OhlcInterval>(initialInterval);
  const [loaded, setLoaded] = useState<Loaded>({ key: "", interval: initialInterval, candles: [], error: null });
  const live = useMarket((s) => s.quotes.get(quoteKey(symbol, market)));
  useWebSocket({ symbols: [symbol] });
  const key = `${symbol}:${market}:${interval}`;
  // while another interval loads, the old candles stay up (status says "Loading…")
  const state = loaded.key !== key ? "loading" : loaded.error ? "error" : "ready";

  useEffect(() => {
    window.__sow = { store: marketStore };
  }, []);

  useEffect(() => {
    document.title = `${symbol} ${market === "SPOT" ? "spot" : "futures"} · sow`;
  }, [symbol, market]);

  useEffect(() => {
    let controller: AbortController | null = null;
    const load = async () => {
      controller?.abort();
      controller = new AbortController();
      try {
        const candles = await fetchOhlc(symbol, market, interval, controller.signal);
        setLoaded({ key, interval, candles, error: null });
      } catch (exc) {
        if (controller.signal.aborted) return;
        const error = exc instanceof Error ? exc.message : String(exc);
        setLoaded((prev) => ({ key, interval, candles: prev.key === key ? prev.candles : [], error }));
      }
    };
    void load();
    const timer = setInterval(() => void load(), REFRESH_MS);
    return () => {
      clearInterval(timer);
      controller?.abort();
    };
  }, [symbol, market, interval, key]);

  const other: Market = market === "SPOT" ? "FUTURES" : "SPOT";
  return (
    <main className={styles.page}>
      <header className={styles.header}>
        <Link href="/" className={styles.back}>
          ← Market
        </Link>
        <h1 className={styles.title} data-testid="detail-symbol">
          {symbol}
        </h1>
        <nav className={styles.segmented} aria-label="Market">
          {(["SPOT", "FUTURES"] as const).map((m) => (
            <Link
              key={m}
              href={`/detail/?symbol=${encodeURIComponent(symbol)}&market=${m}&interval=${interval}`}
              aria-current={m === market ? "page" : undefined}
              prefetch={false}
            >
              {m === "SPOT" ? "Spot" : "Futures"}
            </Link>
          ))}
        </nav>
        <ConnectionIndicator />
      </header>

      <section className={styles.quote} aria-label="Live quote">
        <div className={styles.price} data-testid="live-price">
          <FlashPrice quote={live} />
        </div>
        <LiveFigures quote={live} />
      </section>

      <section className={styles.chartPanel} aria-label="Candles">
        <div className={styles.chartBar}>
          <div className={styles.segmented} role="group" aria-label="Interval">
            {OHLC_INTERVALS.map((iv) => (
              <button
                key={iv}
                type="button"
                aria-pressed={iv === interval}
                onClick={() => pickInterval(iv)}
                data-interval={iv}
              >
                {iv}
              </button>
            ))}
          </div>
          <span className={styles.chartStatus} data-testid="chart-status" data-state={state}>
            {state === "loading"
              ? "Loading…"
              : state === "error"
                ? `Could not load candles (${loaded.error})`
                : loaded.candles.length === 0
                  ? `No ${market.toLowerCase()} trades stored for ${symbol} in this range yet (is sow persist running?)`
                  : `${loaded.candles.length} candles · UTC`}
          </span>
        </div>
        <CandlestickChart
          candles={loaded.candles}
          live={live}
          intervalS={intervalSeconds(loaded.interval)}
          fitKey={loaded.key}
        />
        <p className={styles.hint}>
          Also on{" "}
          <Link href={`/detail/?symbol=${encodeURIComponent(symbol)}&market=${other}&interval=${interval}`} prefetch={false}>
            {other === "SPOT" ? "Spot" : "Futures"}
          </Link>
          .
        </p>
      </section>
    </main>
  );
}
