"""Network layer: TCP connections and UDP framing. Bytes move here; meaning lives in protocol/."""
