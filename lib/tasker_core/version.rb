# frozen_string_literal: true

module TaskerCore
  VERSION = "0.1.0"
  # Version of the wire protocol spoken between orchestrator and workers
  # (docs/protocol.md). Bumped on any incompatible change.
  PROTOCOL_VERSION = 1
end
