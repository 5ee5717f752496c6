//! Criterion benchmarks for Commons live in `benches/`; scripts that print
//! ratios measured in one run live in `scripts/`.
