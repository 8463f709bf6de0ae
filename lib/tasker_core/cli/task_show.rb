# frozen_string_literal: true

require_relative "table"

module TaskerCore
  class CLI
    # tasker task show ID
    #
    # Payloads are msgpack; in JSON a msgpack binary value (bin) is shown as
    # {"$binary": "<base64>"}, and a binary map key as "$binary:<base64>".
    class TaskShow < Command
      ARGUMENTS = "ID"
      ARITY = 1
      DESCRIPTION = "Shows a task, its context and its steps (state, attempts, dependencies), then each step's output\n" \
                    "and whole last error with its backtrace. Times are ISO 8601 (UTC, milliseconds)."

      private

      def define_options(o)
        o.on("--json", "print the task as JSON (a binary value as {\"$binary\": BASE64})") { @options[:json] = true }
      end

      def call(args)
        id = integer_arg(args.first, "ID")
        use_database!
        task = Tasks.task(id) or raise Error, "there is no task #{id}"
        return print_json(json_safe(task)) || EXIT_OK if @options[:json]

        out.puts "task #{task[:id]}  #{task[:namespace]}/#{task[:name]}@#{task[:version]}  #{task[:status]}"
        out.puts "identity key: #{task[:identity_key]}" if task[:identity_key]
        out.puts "created #{stamp(task[:created_at])}#{"  finished #{stamp(task[:finished_at])}" if task[:finished_at]}"
        out.puts "context: #{shown(task[:context])}"
        out.puts
        rows = task[:steps].map do |s|
          # attempts: times claimed (a step handed back unstarted is claimed
          # again); the retry budget, max_attempts, bounds the failures
          [s[:id], s[:name], s[:state], s[:attempts], "#{s[:failures]}/#{s[:max_attempts]}",
           s[:depends_on].empty? ? nil : s[:depends_on].join(","), duration(s), stamp(s[:finished_at])]
        end
        out.puts Table.render(%w[STEP NAME STATE ATTEMPTS FAILURES DEPENDS_ON DURATION FINISHED], rows)
        task[:steps].each { |s| print_details(s) }
        EXIT_OK
      end

      # Strings JSON can carry as they are; msgpack bin values (binary
      # Strings) as {"$binary" => base64}.
      def json_safe(value)
        case value
        when Hash then value.to_h { |k, v| [json_key(k), json_safe(v)] }
        when Array then value.map { |v| json_safe(v) }
        when String then binary?(value) ? { "$binary" => [value].pack("m0") } : value
        else value
        end
      end

      def json_key(key)
        return key unless key.is_a?(String) && binary?(key)

        "$binary:#{[key].pack('m0')}"
      end

      def binary?(str) = str.encoding == Encoding::BINARY || !str.valid_encoding?

      def duration(step)
        return nil unless step[:finished_at] && step[:last_attempt_at]

        "#{((step[:finished_at] - step[:last_attempt_at]) * 1000).round(1)}ms"
      end

      # Each step's output and last error, whole (backtrace included).
      def print_details(step)
        error = step[:error]
        return if step[:output].nil? && !error.is_a?(Hash)

        out.puts
        out.puts "step #{step[:id]} #{step[:name]} (#{step[:state]})"
        out.puts "  output: #{shown(step[:output])}" unless step[:output].nil?
        return unless error.is_a?(Hash)

        retry_note = error["retryable"] == false ? " (not retryable)" : ""
        out.puts "  last error#{" at #{stamp(step[:last_failure_at])}" if step[:last_failure_at]}#{retry_note}:"
        lines = "#{error['class']}: #{error['message']}".lines.map(&:chomp)
        lines.each { |l| out.puts "    #{escaped(l)}" }
        Array(error["backtrace"]).each { |l| out.puts "      #{escaped(l.to_s)}" }
      end

      # Task data as one line of JSON (control characters escaped), binary
      # values as in --json.
      def shown(value) = JSON.generate(json_safe(value))

      def escaped(text) = text.scrub.gsub(/[\x00-\x08\x0b-\x1f\x7f]/) { |c| c.inspect[1...-1] }
    end
  end
end
