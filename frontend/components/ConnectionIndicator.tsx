"use client";

import { useNow } from "@/hooks/useNow";
import { useMarket } from "@/store/marketStore";

import styles from "./ConnectionIndicator.module.css";

/** A dot and a word for the socket's state; a countdown while it waits to reconnect. */
export function ConnectionIndicator() {
  const connection = useMarket((s) => s.connection);
  const now = useNow();
  let label: string;
  switch (connection.status) {
    case "open":
      label = "Live";
      break;
    case "connecting":
    case "idle":
      label = "Connecting…";
      break;
    case "reconnecting":
      label =
        connection.retryAt && now && connection.retryAt > now
          ? `Reconnecting in ${Math.ceil((connection.retryAt - now) / 1000)} s`
          : "Reconnecting…";
      break;
    case "closed":
      label = "Offline";
      break;
  }
  const title = [
    `WebSocket: ${connection.status}`,
    connection.attempt ? `attempt ${connection.attempt}` : "",
    connection.error ?? "",
  ]
    .filter(Boolean)
    .join(" · ");
  return (
    <span
      className={styles.indicator}
      data-status={connection.status}
      data-testid="connection"
      role="status"
      aria-live="polite"
      title={title}
    >
      <span className={styles.dot} aria-hidden="true" />
      <span className={styles.label}>{label}</span>
    </span>
  );
}
