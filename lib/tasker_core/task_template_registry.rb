# frozen_string_literal: true

require_relative "task_template"

module TaskerCore
  # The task templates a process knows: loaded from a folder of YAML files
  # (tasks.template_dir) and/or registered in code; looked up by namespace,
  # name and version (the highest version when none is given).
  class TaskTemplateRegistry
    def self.from_config(config = TaskerCore.config, validate_handlers: false)
      dir = config.tasks["template_dir"]
      root = defined?(::Rails) && ::Rails.respond_to?(:root) && ::Rails.root ? ::Rails.root.to_s : Dir.pwd
      new(dir: File.expand_path(dir, root), validate_handlers: validate_handlers)
    end

    attr_reader :dir

    def initialize(dir: nil, validate_handlers: false)
      @dir = dir
      @templates = {}
      @lock = Mutex.new
      load_dir(dir, validate_handlers: validate_handlers) if dir && File.directory?(dir)
    end

    def load_dir(dir, validate_handlers: false)
      Dir[File.join(dir, "**", "*.{yml,yaml}")].sort.each do |path|
        register(TaskTemplate.load_file(path, validate_handlers: validate_handlers))
      end
      self
    end

    def register(template)
      @lock.synchronize do
        if (other = @templates[template.key]) && other.path != template.path
          raise ConfigurationError, "Invalid task template #{template.path}: #{template.full_name} is already " \
                                    "defined by #{other.path}"
        end
        @templates[template.key] = template
      end
    end

    def templates = @lock.synchronize { @templates.values }

    # Raises ConfigurationError when there is no such template.
    def find(name:, namespace: "default", version: nil)
      found = @lock.synchronize do
        if version
          @templates[[namespace.to_s, name.to_s, version.to_s]]
        else
          @templates.values.select { |t| t.namespace == namespace.to_s && t.name == name.to_s }
                    .max_by { |t| version_key(t.version) }
        end
      end
      return found if found

      raise ConfigurationError, "no task template #{namespace}/#{name}#{version ? "@#{version}" : ''} " \
                                "(known: #{templates.map(&:full_name).sort.join(', ')}; folder: #{dir || 'none'})"
    end

    private

    def version_key(version)
      Gem::Version.correct?(version) ? [1, Gem::Version.new(version)] : [0, version]
    end
  end

  @task_templates = nil
  class << self
    # The process's template registry, loaded from tasks.template_dir on first use.
    def task_templates
      @task_templates ||= TaskTemplateRegistry.from_config
    end

    attr_writer :task_templates
  end
end
