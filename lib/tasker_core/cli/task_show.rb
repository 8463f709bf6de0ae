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
      DESCRIPTION = "Shows a task, its context and its steps (state, attempts, dependencies, last error)."

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
        out.puts "context: #{JSON.generate(json_safe(task[:context]))}"
        out.puts
        rows = task[:steps].map do |s|
          [s[:id], s[:name], s[:state], "#{s[:attempts]}/#{s[:max_attempts]}", s[:failures],
           s[:depends_on].empty? ? nil : s[:depends_on].join(","), duration(s), error_text(s[:error])]
        end
        out.puts Table.render(%w[STEP NAME STATE ATTEMPTS FAILURES DEPENDS_ON DURATION LAST_ERROR], rows)
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

      def stamp(time) = time&.strftime("%Y-%m-%d %H:%M:%S.%L UTC")

      def duration(step)
        return nil unless step[:finished_at] && step[:last_attempt_at]

        "#{((step[:finished_at] - step[:last_attempt_at]) * 1000).round(1)}ms"
      end

      def error_text(error)
        return nil unless error.is_a?(Hash)

        text = [error["class"], error["message"]].compact.join(": ")
        text.size > 60 ? "#{text[0, 57]}..." : text
      end
    end
  end
end
