/** Joins class names, skipping empty ones: `cx(styles.cell, sorted && styles.sorted)`. */
export function cx(...names: (string | false | null | undefined)[]): string {
  return names.filter(Boolean).join(" ");
}
