# frozen_string_literal: true

# Step handlers of the soak run (bench/soak/soak.rb), loaded by its worker
# processes through `tasker-worker --handlers`.
module SoakHandlers
  # Sleeps a few milliseconds (handler_config "max_ms") and echoes.
  class Work
    def call(task, sequence, step)
      sleep(rand * step.handler_config.fetch("max_ms", 20) / 1000.0)
      { "step" => step.name, "n" => task.context["n"], "deps" => sequence.to_h.keys.sort }
    end
  end

  # Returns an output of handler_config "bytes" bytes.
  class Big
    def call(_task, _sequence, step)
      { "blob" => "x" * step.handler_config.fetch("bytes") }
    end
  end

  # Reads its dependency's big output and returns its size only.
  class Consume
    def call(_task, sequence, _step)
      { "seen" => sequence.to_h.values.sum { |o| o["blob"].to_s.bytesize } }
    end
  end

  # Kills the worker that runs it: the step is lost each time and must end
  # in error (StepLostError) after orchestration.max_lost_attempts.
  class Crash
    def call(_task, _sequence, _step)
      Process.kill("KILL", Process.pid)
      sleep 1
    end
  end
end
