import type { LiveQuote } from "@/types/market";
import { formatPrice } from "@/lib/format";

import styles from "./FlashPrice.module.css";

/**
 * A price that flashes green or red when it changes. The flash is a CSS animation restarted by
 * keying the element on the quote's sequence number: no timers, no extra state.
 */
export function FlashPrice({ quote, testId }: { quote: LiveQuote | undefined; testId?: string }) {
  if (!quote) {
    return (
      <span className={styles.empty} data-testid={testId}>
        —
      </span>
    );
  }
  const direction = quote.tick > 0 ? styles.up : quote.tick < 0 ? styles.down : styles.flat;
  return (
    <span key={`${quote.seq ?? ""}:${quote.ts}`} className={direction} data-testid={testId}>
      {formatPrice(quote.price)}
    </span>
  );
}
