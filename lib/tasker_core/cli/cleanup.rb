# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker cleanup [--older-than DURATION] [--batch-size N] [--json]
    class Cleanup < Command
      DESCRIPTION = <<~TEXT.chomp
        Deletes finished tasks (complete, error, cancelled) that finished longer ago than
        --older-than (default retention.finished_after), with their steps, dependency edges and
        transition histories, #{Retention::BATCH_SIZE} tasks per transaction (TaskerCore::Retention).
        Orchestrators do the same periodically; one cleaner runs at a time per database, and this
        command exits 1 when another one is running.
      TEXT

      private

      def define_options(o)
        o.on("--older-than DURATION", "finished longer ago than this: 45s, 30m, 12h, 7d") { |v| @options[:older_than] = v }
        o.on("--batch-size N", "tasks per transaction (default #{Retention::BATCH_SIZE})") { |v| @options[:batch_size] = v }
        o.on("--json", "print the counts as JSON") { @options[:json] = true }
      end

      def call(_args)
        after = @options[:older_than] || config.retention["finished_after"]
        if after.nil?
          raise UsageError, "--older-than is required: retention.finished_after is null (keep everything)"
        end

        older_than = duration_arg(after, "--older-than")
        batch_size = @options[:batch_size] ? integer_arg(@options[:batch_size], "--batch-size") : Retention::BATCH_SIZE
        use_database!
        result = Store.with_connection do |c|
          Retention.new(older_than: older_than, batch_size: batch_size).run(c)
        end
        raise Error, "another process is cleaning up this database; try again later" if result.nil?

        if @options[:json]
          print_json("tasks" => result.tasks, "steps" => result.steps, "batches" => result.batches,
                     "older_than_seconds" => older_than)
        else
          out.puts "deleted #{result.tasks} finished task#{'s' unless result.tasks == 1} " \
                   "(#{result.steps} step#{'s' unless result.steps == 1}) that finished more than #{after} ago"
        end
        EXIT_OK
      end
    end
  end
end
