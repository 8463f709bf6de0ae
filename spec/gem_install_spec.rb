# frozen_string_literal: true

require "tmpdir"
require "open3"
require "rbconfig"

# Builds the gem the way a user receives it and installs it into an empty
# GEM_HOME, so a file missing from the gemspec or an extconf that only works
# inside the checkout fails here rather than on a user's machine.
RSpec.describe "the packaged gem", :no_valgrind do
  it "builds, installs into a fresh GEM_HOME and round-trips through the codec" do
    Dir.mktmpdir("tasker_core_gem") do |dir|
      root = SpecHelpers::ROOT
      out, status = Open3.capture2e("gem", "build", File.join(root, "tasker_core.gemspec"), "--output",
                                    File.join(dir, "tasker_core.gem"), chdir: root)
      expect(status).to be_success, out

      # runtime dependencies (json_schemer) come from the machine's installed gems
      env = { "GEM_HOME" => File.join(dir, "home"), "GEM_PATH" => [File.join(dir, "home"), *Gem.path].join(File::PATH_SEPARATOR),
              "BUNDLE_GEMFILE" => nil, "RUBYOPT" => nil, "RUBYLIB" => nil }
      out, status = Open3.capture2e(env, "gem", "install", "--local", "--no-document",
                                    File.join(dir, "tasker_core.gem"), chdir: dir)
      expect(status).to be_success, out

      script = 'require "tasker_core"; p TaskerCore::Codec.unpack(TaskerCore::Codec.pack({"a"=>[1,2.5,nil]})); ' \
               'puts $LOADED_FEATURES.grep(/tasker_core_ext/); require "tasker_core/web"; ' \
               'puts Dir[File.join(TaskerCore::Web::VIEWS, "*.erb")].map { |f| File.basename(f) }.sort.join(",")'
      out, status = Open3.capture2e(env, RbConfig.ruby, "-e", script, chdir: dir)
      expect(status).to be_success, out
      expect(out.lines.first.chomp).to eq('{"a"=>[1, 2.5, nil]}')
      expect(out).to include(File.join(dir, "home"))
      expect(out.lines.last.chomp.split(",")).to include("layout.erb", "task.erb", "overview.erb") # the dashboard's views
    end
  end
end
