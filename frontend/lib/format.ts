/**
 * Number and time formatting for the table and the detail view.
 *
 * Every `Intl.NumberFormat` is created once, here: constructing one costs far more than using it,
 * and the table formats thousands of numbers a second. A fixed locale (en-US) keeps the columns
 * the same width for every visitor.
 */

const LOCALE = "en-US";

const priceLarge = new Intl.NumberFormat(LOCALE, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const priceMedium = new Intl.NumberFormat(LOCALE, { minimumFractionDigits: 2, maximumFractionDigits: 4 });
const priceSmall = new Intl.NumberFormat(LOCALE, {
  minimumSignificantDigits: 2,
  maximumSignificantDigits: 5,
});
const percent = new Intl.NumberFormat(LOCALE, {
  minimumFractionDigits: 2,
  maximumFractionDigits: 2,
  signDisplay: "exceptZero",
});
const basisPercent = new Intl.NumberFormat(LOCALE, {
  minimumFractionDigits: 3,
  maximumFractionDigits: 3,
  signDisplay: "exceptZero",
});
const compact = new Intl.NumberFormat(LOCALE, { notation: "compact", maximumFractionDigits: 2 });
const rate = new Intl.NumberFormat(LOCALE, {
  minimumFractionDigits: 4,
  maximumFractionDigits: 4,
  signDisplay: "exceptZero",
});

export const DASH = "—";

export function formatPrice(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  const abs = Math.abs(value);
  if (abs >= 1000) return priceLarge.format(value);
  if (abs >= 1) return priceMedium.format(value);
  return priceSmall.format(value);
}

/** `2.5` -> `+2.50%` */
export function formatPercent(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  return `${percent.format(value)}%`;
}

/** basis in percent with three decimals: `0.0123` -> `+0.012%` */
export function formatBasis(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  return `${basisPercent.format(value)}%`;
}

/** `1234567` -> `1.23M` */
export function formatCompact(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  return compact.format(value);
}

/** funding rate as a percentage: `0.0001` -> `+0.0100%` */
export function formatFunding(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return DASH;
  return `${rate.format(value * 100)}%`;
}

/** Age of an update: `0s`, `42s`, `5m`, `3h`, `2d` (never negative: clocks differ a little). */
export function formatAge(ageMs: number | null): string {
  if (ageMs === null || !Number.isFinite(ageMs)) return DASH;
  const s = Math.max(0, Math.floor(ageMs / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86_400)}d`;
}
