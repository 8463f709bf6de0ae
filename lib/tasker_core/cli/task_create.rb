# frozen_string_literal: true

module TaskerCore
  class CLI
    # tasker task create NAME --context JSON
    class TaskCreate < Command
      ARGUMENTS = "NAME"
      ARITY = 1
      DESCRIPTION = <<~TEXT.chomp
        Creates a task from the task template NAME (templates are read from
        tasks.template_dir, or --templates DIR) and prints its id.
        The same --identity-key returns the existing task's id. --queue and
        --priority apply to the steps that do not name their own; --delay
        starts it that many seconds from now.
      TEXT

      private

      def define_options(o)
        o.on("--context JSON", "the task's input, a JSON object (default {})") { |v| @options[:context] = v }
        o.on("--namespace NAME", "template namespace (default \"default\")") { |v| @options[:namespace] = v }
        o.on("--version VERSION", "template version (default the highest)") { |v| @options[:version] = v }
        o.on("--identity-key KEY", "deduplication key: a second create returns the first task") { |v| @options[:identity_key] = v }
        o.on("--templates DIR", "folder of task template YAML files (default tasks.template_dir)") { |v| @options[:templates] = v }
        o.on("--queue NAME", "queue of its steps that name none (default the template's)") { |v| @options[:queue] = v }
        o.on("--priority N", Integer, "priority, -100..100, higher first (default the template's)") { |v| @options[:priority] = v }
        o.on("--delay SECONDS", Float, "start no earlier than this many seconds from now") { |v| @options[:delay] = v }
        o.on("--json", "print {\"task_id\": ID} instead of the bare id") { @options[:json] = true }
      end

      def call(args)
        context = @options.key?(:context) ? json_object(@options[:context], "--context") : {}
        use_database!
        templates = if @options[:templates]
                      TaskTemplateRegistry.new(dir: File.expand_path(@options[:templates]), validate_handlers: false)
                    else
                      TaskTemplateRegistry.from_config(validate_handlers: false)
                    end
        id = Tasks.create_task(name: args.first, namespace: @options[:namespace] || "default",
                               version: @options[:version], context: context,
                               identity_key: @options[:identity_key], queue: @options[:queue],
                               priority: @options[:priority], delay: @options[:delay], templates: templates)
        @options[:json] ? print_json("task_id" => id) : out.puts(id)
        EXIT_OK
      end
    end
  end
end
