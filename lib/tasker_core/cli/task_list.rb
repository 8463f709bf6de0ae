# frozen_string_literal: true

require "time"
require_relative "table"

module TaskerCore
  class CLI
    # tasker task list [--state S] [--name N] [--namespace NS] [--since T] [--limit N] [--json]
    class TaskList < Command
      DESCRIPTION = <<~TEXT.chomp
        Lists tasks, newest first: id, namespace/name@version, state, steps left of all,
        identity key, created and finished (ISO 8601, UTC, milliseconds).
        --since takes a duration back from now (30m, 12h, 7d) or an ISO 8601 time.
      TEXT
      STATES = %w[pending in_progress complete error cancelled].freeze
      DEFAULT_LIMIT = 50

      SQL = <<~SQL
        SELECT id, namespace, name, version, state, identity_key, step_count, remaining_steps,
               extract(epoch FROM created_at)::float8 AS created_at,
               extract(epoch FROM finished_at)::float8 AS finished_at
          FROM tasker_tasks
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR name = $2)
           AND ($3::text IS NULL OR namespace = $3) AND ($4::float8 IS NULL OR created_at >= to_timestamp($4))
         ORDER BY id DESC
         LIMIT $5
      SQL

      private

      def define_options(o)
        o.on("--state S", "only tasks in this state (#{STATES.join(', ')})") { |v| @options[:state] = v }
        o.on("--name N", "only tasks of this template name") { |v| @options[:name] = v }
        o.on("--namespace NS", "only tasks in this namespace") { |v| @options[:namespace] = v }
        o.on("--since T", "only tasks created since T: a duration back from now (7d) or an ISO 8601 time") do |v|
          @options[:since] = v
        end
        o.on("--limit N", "at most N tasks (default #{DEFAULT_LIMIT})") { |v| @options[:limit] = v }
        o.on("--json", "print JSON (an array of tasks)") { @options[:json] = true }
      end

      def call(_args)
        state = @options[:state]
        raise UsageError, "--state must be one of #{STATES.join(', ')}, got #{state.inspect}" if state && !STATES.include?(state)

        limit = @options[:limit] ? integer_arg(@options[:limit], "--limit") : DEFAULT_LIMIT
        since = @options[:since] && since_arg(@options[:since])
        use_database!
        tasks = Store.with_connection do |c|
          c.exec(SQL, [state, @options[:name], @options[:namespace], since&.to_f, limit]).map { |r| task_row(r) }
        end
        return print_json(tasks) || EXIT_OK if @options[:json]

        if tasks.empty?
          out.puts "no tasks"
        else
          rows = tasks.map do |t|
            [t["id"], "#{t['namespace']}/#{t['name']}@#{t['version']}", t["state"],
             "#{t['remaining_steps']}/#{t['step_count']}", t["identity_key"], stamp(t["created_at"]),
             stamp(t["finished_at"])]
          end
          out.puts Table.render(%w[ID TASK STATE STEPS_LEFT IDENTITY_KEY CREATED FINISHED], rows)
        end
        EXIT_OK
      end

      def task_row(row)
        t = row.to_h
        %w[created_at finished_at].each { |k| t[k] = t[k] && Time.at(t[k]).utc }
        t
      end

      def since_arg(value)
        return Time.now - Config.duration_seconds(value) if value.match?(Config::DURATION)

        Time.iso8601(value)
      rescue ArgumentError
        raise UsageError, "--since must be a duration (30m, 12h, 7d) or an ISO 8601 time, got #{value.inspect}"
      end
    end
  end
end
