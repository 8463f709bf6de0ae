# frozen_string_literal: true

require_relative "errors"

module TaskerCore
  # The rules every layer shares for queues, priorities and concurrency
  # limits (templates, create_task, the worker, the configuration). The
  # claim that honours them is SQL (db/migrate/0010).
  module Queues
    DEFAULT = "default"
    # Queue names: letters, digits and _ . : - , 1 to 63 characters.
    NAME = /\A[A-Za-z0-9_.:-]{1,63}\z/
    # Higher runs first. One point is worth one second of waiting (the
    # claim orders by ready time less priority seconds), so a ready step is
    # passed by steps that became ready after it for at most
    # (highest priority in its queue - its priority) seconds: 200 s at most.
    PRIORITY = (-100..100)
    # A worker serves at most this many queues (advertised in heartbeats).
    MAX_PER_WORKER = 16
    # %{context.a.b} in a concurrency key.
    KEY_FIELD = /%\{context((?:\.[A-Za-z0-9_-]+)+)\}/

    module_function

    def name?(value) = value.is_a?(String) && value.match?(NAME)
    def priority?(value) = value.is_a?(Integer) && PRIORITY.cover?(value)

    def name_problem(value)
      "expected a queue name (1 to 63 of A-Z a-z 0-9 _ . : -), got #{value.inspect}"
    end

    def priority_problem(value)
      "expected an Integer between #{PRIORITY.min} and #{PRIORITY.max} (higher runs first), got #{value.inspect}"
    end

    # A list of queue names ("a,b" or ["a", "b"]); ArgumentError naming
    # what is wrong.
    def list(value)
      names = value.is_a?(String) ? value.split(",").map(&:strip) : Array(value).map { |v| v.is_a?(Symbol) ? v.to_s : v }
      bad = names.find { |n| !name?(n) }
      raise ArgumentError, "queues: #{name_problem(bad)}" if bad
      raise ArgumentError, "queues: expected 1 to #{MAX_PER_WORKER} queue names, got #{names.size}" unless names.size.between?(1, MAX_PER_WORKER)

      names.uniq.freeze
    end

    # The key of a concurrency limit for one task: each %{context.path}
    # replaced by the value at that path of its context (a String, Symbol or
    # Integer). nil when the template set no key. ValidationError naming the
    # template and the path when a value is missing.
    def concurrency_key(template, pattern, context)
      return nil if pattern.nil?

      pattern.gsub(KEY_FIELD) do
        path = Regexp.last_match(1).delete_prefix(".").split(".")
        value = path.reduce(context) { |h, k| h.is_a?(Hash) ? h.fetch(k) { h[k.to_sym] } : nil }
        unless value.is_a?(String) || value.is_a?(Symbol) || value.is_a?(Integer)
          raise ValidationError, "context for #{template}: concurrency.key #{pattern.inspect} needs context." \
                                 "#{path.join('.')} (a String or Integer), got #{value.inspect}"
        end
        value.to_s
      end
    end
  end
end
