import type { NextConfig } from "next";

/**
 * The dashboard is a static export (`npm run build` -> `out/`) that `sow serve-api` serves at
 * `/market`, so every page and asset lives under that base path: `npm run dev` serves
 * http://localhost:3000/market and the exported files reference `/market/_next/...`.
 * `trailingSlash` makes the export `detail/index.html`, which any static file server (Starlette's
 * `StaticFiles(html=True)` included) resolves for `/market/detail/`.
 */
const nextConfig: NextConfig = {
  output: "export",
  basePath: "/market",
  trailingSlash: true,
  reactStrictMode: true,
  images: { unoptimized: true },
  poweredByHeader: false,
};

export default nextConfig;
