"""cacheoperator: a kopf operator that runs CacheCluster resources as cache appliances."""

__version__ = "0.1.0"
