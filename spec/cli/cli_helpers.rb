# frozen_string_literal: true

require "open3"
require "rbconfig"

# Runs exe/tasker as a subprocess with the checkout's lib/ (what the specs
# under spec/cli test: the command line as users run it).
module CLIHelpers
  ROOT = File.expand_path("../..", __dir__)
  EXE = File.join(ROOT, "exe", "tasker")
  TEMPLATES = File.join(ROOT, "examples", "order_fulfilment", "templates")
  # Environment variables that would change what the CLI reads.
  CLEAN_ENV = %w[DATABASE_URL TASKER_ENV RAILS_ENV RACK_ENV TASKER_CONFIG_PATH TASKER_TRACE PGHOST PGDATABASE PGSERVICE
                 TASKER_BATCH_ENDPOINT TASKER_RESULT_ENDPOINT].to_h { |k| [k, nil] }.freeze

  Result = Struct.new(:out, :err, :status) do
    def exitstatus = status.exitstatus
    def err_lines = err.lines.map(&:chomp).reject(&:empty?)
  end

  def tasker_command(*args)
    [RbConfig.ruby, "-I", File.join(ROOT, "lib"), EXE, *args.map(&:to_s)]
  end

  # env: extra environment (DATABASE_URL and the like); nil values unset.
  def tasker(*args, env: {}, stdin: "")
    out, err, status = Open3.capture3(CLEAN_ENV.merge(env), *tasker_command(*args), stdin_data: stdin, chdir: ROOT)
    Result.new(out, err, status)
  end

  def db_env = { "DATABASE_URL" => db_url }

  def order_context(order_id = 7)
    { "order_id" => order_id, "customer_email" => "c#{order_id}@example.com",
      "items" => [{ "sku" => "mug-42", "quantity" => 2, "unit_price_cents" => 1250 }] }
  end

  def create_order_task(order_id = 7)
    r = tasker("task", "create", "order_fulfilment", "--namespace", "demo", "--templates", TEMPLATES,
               "--context", JSON.generate(order_context(order_id)), env: db_env)
    expect(r.exitstatus).to eq(0), r.err
    Integer(r.out.strip)
  end
end
