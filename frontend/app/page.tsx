import { MarketPage } from "@/components/MarketPage";

/** `/market` (the app's base path): the live market table. */
export default function Page() {
  return <MarketPage />;
}
