"use client";

import {
  CandlestickSeries,
  ColorType,
  createChart,
  type CandlestickData,
  type IChartApi,
  type ISeriesApi,
  type UTCTimestamp,
} from "lightweight-charts";
import { useEffect, useRef } from "react";

import type { Candle, LiveQuote } from "@/types/market";

import styles from "./DetailView.module.css";

function precisionFor(price: number): number {
  const abs = Math.abs(price);
  if (abs >= 1000) return 2;
  if (abs >= 1) return 4;
  if (abs >= 0.01) return 6;
  return 8;
}

function toBar(c: Candle): CandlestickData<UTCTimestamp> {
  return { time: c.time as UTCTimestamp, open: c.open, high: c.high, low: c.low, close: c.close };
}

interface Props {
  candles: Candle[];
  /** the live quote: moves the newest candle (or opens the next one) between refreshes */
  live: LiveQuote | undefined;
  intervalS: number;
  /** the chart zooms to fit whenever this changes (symbol, market, interval) */
  fitKey: string;
}

/** A lightweight-charts candlestick chart, times in UTC. */
export function CandlestickChart({ candles, live, intervalS, fitKey }: Props) {
  const containerRef = useRef<HTMLDivElement>(null);
  const chartRef = useRef<IChartApi | null>(null);
  const seriesRef = useRef<ISeriesApi<"Candlestick"> | null>(null);
  const lastRef = useRef<CandlestickData<UTCTimestamp> | null>(null);
  const fittedRef = useRef<string | null>(null);

  useEffect(() => {
    const container = containerRef.current;
    if (!container) return;
    const css = getComputedStyle(document.documentElement);
    const color = (name: string, fallback: string) => css.getPropertyValue(name).trim() || fallback;
    const chart = createChart(container, {
      autoSize: true,
      layout: {
        background: { type: ColorType.Solid, color: "transparent" },
        textColor: color("--muted", "#8b94a7"),
        fontFamily: color("--mono", "monospace"),
      },
      grid: {
        vertLines: { color: "rgba(35, 44, 61, 0.5)" },
        horzLines: { color: "rgba(35, 44, 61, 0.5)" },
      },
      rightPriceScale: { borderColor: color("--border", "#232c3d") },
      timeScale: { borderColor: color("--border", "#232c3d"), timeVisible: true, secondsVisible: false },
    });
    const up = color("--up", "#16c784");
    const down = color("--down", "#ea3943");
    seriesRef.current = chart.addSeries(CandlestickSeries, {
      upColor: up,
      downColor: down,
      borderUpColor: up,
      borderDownColor: down,
      wickUpColor: up,
      wickDownColor: down,
    });
    chartRef.current = chart;
    return () => {
      chart.remove();
      chartRef.current = null;
      seriesRef.current = null;
      lastRef.current = null;
      fittedRef.current = null;
    };
  }, []);

  useEffect(() => {
    const series = seriesRef.current;
    if (!series) return;
    const bars = candles.map(toBar);
    series.setData(bars);
    lastRef.current = bars.at(-1) ?? null;
    if (lastRef.current) {
      const precision = precisionFor(lastRef.current.close);
      series.applyOptions({ priceFormat: { type: "price", precision, minMove: 10 ** -precision } });
    }
    if (bars.length && fittedRef.current !== fitKey) {
      chartRef.current?.timeScale().fitContent();
      fittedRef.current = fitKey;
    }
  }, [candles, fitKey]);

  useEffect(() => {
    const series = seriesRef.current;
    const last = lastRef.current;
    if (!series || !last || !live) return;
    const bucket = (Math.floor(live.ts / 1000 / intervalS) * intervalS) as UTCTimestamp;
    let bar: CandlestickData<UTCTimestamp>;
    if (bucket === last.time) {
      bar = { ...last, high: Math.max(last.high, live.price), low: Math.min(last.low, live.price), close: live.price };
    } else if (bucket > last.time) {
      bar = { time: bucket, open: last.close, high: Math.max(last.close, live.price), low: Math.min(last.close, live.price), close: live.price };
    } else {
      return; // a quote older than the newest candle: the next refresh has it
    }
    series.update(bar);
    lastRef.current = bar;
  }, [live, intervalS]);

  return (
    <div
      ref={containerRef}
      className={styles.chart}
      data-testid="candles"
      data-candles={candles.length}
      role="img"
      aria-label={`Candlestick chart, ${candles.length} candles`}
    />
  );
}
