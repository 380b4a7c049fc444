"""Files in and out: output safety (overlap, locks, atomic writes, storage errors, stale
temporaries), bounded file reading, image decoding, the schema of what dgmr reads back, and
the streaming safetensors reader and writers. Builds on :mod:`dgmr.core` only."""
