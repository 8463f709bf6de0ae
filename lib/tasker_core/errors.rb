# frozen_string_literal: true

module TaskerCore
  # Base of every error tasker_core raises on purpose.
  class Error < StandardError; end

  # Bad or missing configuration: the message names the file, the key and
  # what was expected.
  class ConfigurationError < Error; end

  # Bytes that are not valid msgpack, or a message that breaks docs/protocol.md.
  class ProtocolError < Error; end

  # An endpoint that cannot be bound or connected, or a socket that cannot be used.
  class ConnectionError < Error; end

  # A socket or handle used after #close.
  class ClosedError < ConnectionError; end

  # A socket used from a thread other than the one that made it: libzmq
  # sockets are not thread-safe.
  class ThreadOwnershipError < ConnectionError; end

  # A socket, context or handle inherited across fork and used in the child.
  class ForkSafetyError < ConnectionError; end

  # No live worker with free capacity could take a batch.
  class NoWorkersError < Error; end

  # PostgreSQL refused or could not be reached. #sqlstate is the server's
  # SQLSTATE code ("23505", ...; "08001"/"08006" when the connection failed)
  # or nil.
  class StoreError < Error
    attr_reader :sqlstate

    def initialize(message = nil, sqlstate: nil)
      super(message)
      @sqlstate = sqlstate
    end
  end

  # A task context that does not match its template's context_schema; the
  # message names the failing path.
  class ValidationError < Error; end

  # TaskerCore.wait_for gave up before the task finished.
  class WaitTimeoutError < Error; end

  # TaskerCore::RSpec would empty a database that is not a test database.
  class UnsafeDatabaseError < Error; end

  # A step named a handler the registry does not know.
  class UnknownHandlerError < Error; end

  # A step ran past its timeout.
  class StepTimeoutError < Error; end

  # A payload (task context, handler_config, step output, message) over a
  # size or depth limit. The message names the payload, its size or depth
  # and the limit (docs/reliability.md, "Limits").
  class PayloadError < Error; end

  # A payload larger than its limit (zeromq.max_context_bytes,
  # zeromq.max_result_bytes, a worker's max_message_bytes).
  class PayloadTooLargeError < PayloadError; end

  # A payload nested deeper than zeromq.max_payload_depth.
  class PayloadTooDeepError < PayloadError; end

  # A worker refused a step of a batch it received (docs/protocol.md,
  # batch_refusal); stored as the step's error when the refusal is final.
  class BatchRefusedError < Error; end

  # A step was dispatched more than orchestration.max_lost_attempts times
  # without a result coming back (its worker or orchestrator was lost each
  # time): it fails instead of taking down more workers.
  class StepLostError < Error; end

  # Raised by a step handler: the step failed but may succeed if retried.
  class RetryableError < Error
    attr_reader :retry_after

    def initialize(message = nil, retry_after: nil)
      super(message)
      @retry_after = retry_after
    end
  end

  # Raised by a step handler: the step failed and retrying will not help.
  class PermanentError < Error; end
end
