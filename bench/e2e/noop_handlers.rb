# frozen_string_literal: true

# The step handler of the end-to-end benchmark: does nothing, returns an
# empty output. Loaded by exe/tasker-worker --handlers.
module BenchHandlers
  class Noop
    def call(_task, _sequence, _step)
      {}
    end
  end
end
