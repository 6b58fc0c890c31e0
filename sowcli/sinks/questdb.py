"""QuestDB: the table schema (created explicitly at start) and the ILP/HTTP writer.

``market_data`` holds every Quote (the seed's columns first, then the Quote's other fields);
``candles`` holds klines backfilled from Bybit REST. Both are WAL tables partitioned by day with
DEDUP UPSERT keys, so a redelivered batch or a rerun backfill replaces rows instead of duplicating
them.
"""

from __future__ import annotations

MARKET_DATA_DDL = """
CREATE TABLE IF NOT EXISTS market_data (
    timestamp TIMESTAMP,
    symbol SYMBOL CAPACITY 1024 CACHE,
    market SYMBOL CAPACITY 4 CACHE,
    price DOUBLE,
    volume DOUBLE,
    high24h DOUBLE,
    low24h DOUBLE,
    change24h DOUBLE,
    turnover DOUBLE,
    bid DOUBLE,
    ask DOUBLE,
    mark_price DOUBLE,
    index_price DOUBLE,
    funding_rate DOUBLE,
    open_interest DOUBLE,
    seq LONG,
    recv_us LONG
) TIMESTAMP(timestamp) PARTITION BY DAY WAL
DEDUP UPSERT KEYS(timestamp, symbol, market, seq)
"""

CANDLES_DDL = """
CREATE TABLE IF NOT EXISTS candles (
    timestamp TIMESTAMP,
    symbol SYMBOL CAPACITY 1024 CACHE,
    market SYMBOL CAPACITY 4 CACHE,
    interval SYMBOL CAPACITY 16 CACHE,
    open DOUBLE,
    high DOUBLE,
    low DOUBLE,
    close DOUBLE,
    volume DOUBLE,
    turnover DOUBLE
) TIMESTAMP(timestamp) PARTITION BY DAY WAL
DEDUP UPSERT KEYS(timestamp, symbol, market, interval)
"""
