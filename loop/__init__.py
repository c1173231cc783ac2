"""The feedback loop: replay (traffic with labels), harvest (labels into a data version), retrain (a challenger
decided against the champion) and the demo that runs them end to end. It sits above training, export, deploy and
server, and imports from them; nothing imports it. Importing this package imports nothing (replay runs in the
serve-only environment, without torch)."""
