# frozen_string_literal: true

require "tmpdir"
require "open3"
require "rbconfig"
require "fileutils"
require "rubygems/package"

# Builds the gem the way a user receives it and installs it into an empty
# GEM_HOME, so a file missing from the gemspec or an extconf that only works
# inside the checkout fails here rather than on a user's machine. (The whole
# Rails path from the built gem is `rake rails:fresh_app`, run by bin/test.)
RSpec.describe "the packaged gem", :no_valgrind do
  before(:context) do
    @dir = Dir.mktmpdir("tasker_core_gem")
    @gem = File.join(@dir, "tasker_core.gem")
    out, status = Open3.capture2e("gem", "build", File.join(SpecHelpers::ROOT, "tasker_core.gemspec"), "--output",
                                  @gem, chdir: SpecHelpers::ROOT)
    raise "gem build failed:\n#{out}" unless status.success?
  end

  after(:context) { FileUtils.rm_rf(@dir) }

  it "holds what the generator, the Railtie, the CLI, the schema and the dashboard read" do
    files = Gem::Package.new(@gem).contents
    templates = Dir.chdir(SpecHelpers::ROOT) { Dir["lib/generators/tasker_core/install/templates/*"] }
    expect(templates).to include(end_with("tasker-config.yml.tt"), end_with("migration.rb.tt"))
    expect(files).to include(*templates)
    expect(files).to include("LICENSE", "CHANGELOG.md", "README.md", "config/tasker-config.yml",
                             "lib/tasker_core/railtie.rb", "lib/generators/tasker_core/install/install_generator.rb",
                             "exe/tasker", "exe/tasker-worker", "ext/tasker_core/extconf_helpers.rb",
                             "lib/tasker_core/web/views/layout.erb")
    migrations = Dir.chdir(SpecHelpers::ROOT) { Dir["db/migrate/*.sql"] }
    expect(migrations.size).to be >= 7
    expect(files).to include(*migrations)
    expect(files.grep(/\.(so|o|bundle)\z/)).to be_empty
    spec = Gem::Package.new(@gem).spec
    expect(spec.license).to eq("MIT")
    expect(spec.files).to include("LICENSE")
  end

  it "installs into a fresh GEM_HOME and round-trips through the codec" do
    # runtime dependencies (json_schemer) come from the machine's installed gems
    env = { "GEM_HOME" => File.join(@dir, "home"), "GEM_PATH" => [File.join(@dir, "home"), *Gem.path].join(File::PATH_SEPARATOR),
            "BUNDLE_GEMFILE" => nil, "RUBYOPT" => nil, "RUBYLIB" => nil }
    out, status = Open3.capture2e(env, "gem", "install", "--local", "--no-document", @gem, chdir: @dir)
    expect(status).to be_success, out

    script = 'require "tasker_core"; p TaskerCore::Codec.unpack(TaskerCore::Codec.pack({"a"=>[1,2.5,nil]})); ' \
             'puts $LOADED_FEATURES.grep(/tasker_core_ext/); require "tasker_core/web"; ' \
             'puts Dir[File.join(TaskerCore::Web::VIEWS, "*.erb")].map { |f| File.basename(f) }.sort.join(",")'
    out, status = Open3.capture2e(env, RbConfig.ruby, "-e", script, chdir: @dir)
    expect(status).to be_success, out
    expect(out.lines.first.chomp).to eq('{"a"=>[1, 2.5, nil]}')
    expect(out).to include(File.join(@dir, "home"))
    expect(out.lines.last.chomp.split(",")).to include("layout.erb", "task.erb", "overview.erb") # the dashboard's views
  end
end
