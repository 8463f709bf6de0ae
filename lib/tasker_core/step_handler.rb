# frozen_string_literal: true

module TaskerCore
  # Optional base class for step handlers. A handler returns a Hash (the
  # step's output); it raises RetryableError or PermanentError to say whether
  # a failure is worth retrying; any other exception is treated as retryable.
  class StepHandler
    def call(task, sequence, step)
      raise NotImplementedError, "#{self.class.name} must implement #call(task, sequence, step)"
    end
  end
end
