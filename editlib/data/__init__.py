"""Edit requests and corpora: CounterFact/ZsRE records, statistics corpora, and the offline assets
(fetched from the package registry with their SHA-256) a real-model run prepares."""
