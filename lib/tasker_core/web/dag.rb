# frozen_string_literal: true

require "erb"

module TaskerCore
  class Web
    # A task's steps as an SVG drawing: one box per step, coloured by its
    # state, one arrow per dependency. Layered by depth (the longest chain of
    # parents before a step), left to right; within a layer in step id order,
    # a parent's children stay near it because they are ordered by their
    # parents' rows.
    class Dag
      include ERB::Util

      NODE_W = 170
      NODE_H = 40
      GAP_X = 70
      GAP_Y = 18
      PAD = 12
      MAX_LABEL = 22

      attr_reader :layers

      # steps: rows with "id", "name", "state", "parent_ids" (Queries.task).
      def initialize(steps)
        @steps = steps.to_h { |s| [s["id"], s] }
        @depth = {}
        @steps.each_key { |id| depth(id, []) }
        @layers = @steps.keys.group_by { |id| @depth[id] }.sort.map(&:last)
        order_layers
        @pos = {}
        @layers.each_with_index do |ids, x|
          ids.each_with_index { |id, y| @pos[id] = [PAD + x * (NODE_W + GAP_X), PAD + y * (NODE_H + GAP_Y)] }
        end
      end

      def width = PAD * 2 + [@layers.size, 1].max * (NODE_W + GAP_X) - GAP_X
      def height = PAD * 2 + [@layers.map(&:size).max || 1, 1].max * (NODE_H + GAP_Y) - GAP_Y

      def to_svg
        out = +%(<svg xmlns="http://www.w3.org/2000/svg" class="dag" width="#{width}" height="#{height}" ) <<
              %(viewBox="0 0 #{width} #{height}" role="img" aria-label="step dependency graph">)
        out << %(<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" ) <<
               %(orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>)
        @steps.each_value do |s|
          Array(s["parent_ids"]).each { |p| out << edge(p, s["id"]) if @pos[p] }
        end
        @steps.each_value { |s| out << node(s) }
        out << "</svg>"
      end

      private

      # Longest path from a root; a cycle (refused at task creation) is cut.
      def depth(id, stack)
        return @depth[id] if @depth.key?(id)
        return 0 if stack.include?(id)

        parents = Array(@steps.dig(id, "parent_ids")).select { |p| @steps.key?(p) }
        @depth[id] = parents.empty? ? 0 : parents.map { |p| depth(p, stack + [id]) }.max + 1
      end

      def order_layers
        row = {}
        @layers.each do |ids|
          ids.sort_by! do |id|
            parents = Array(@steps.dig(id, "parent_ids")).filter_map { |p| row[p] }
            [parents.empty? ? 0 : parents.sum.fdiv(parents.size), id]
          end
          ids.each_with_index { |id, i| row[id] = i }
        end
      end

      def edge(from, to)
        x1, y1 = @pos[from]
        x2, y2 = @pos[to]
        x1 += NODE_W
        y1 += NODE_H / 2
        y2 += NODE_H / 2
        mid = (x1 + x2) / 2
        %(<path class="dag-edge" data-from="#{from}" data-to="#{to}" d="M #{x1} #{y1} C #{mid} #{y1}, #{mid} #{y2}, ) +
          %(#{x2} #{y2}" fill="none" stroke="#6b7280" stroke-width="1.5" marker-end="url(#arrow)"/>)
      end

      def node(step)
        x, y = @pos[step["id"]]
        name = step["name"].to_s
        label = name.size > MAX_LABEL ? "#{name[0, MAX_LABEL - 1]}…" : name
        colour = Display.state_colour(step["state"])
        %(<a href="#step-#{step['id']}"><g class="dag-node" data-step-id="#{step['id']}" data-step-name="#{h(name)}" ) +
          %(data-state="#{h(step['state'])}"><title>#{h(name)}: #{h(step['state'])}</title>) +
          %(<rect x="#{x}" y="#{y}" width="#{NODE_W}" height="#{NODE_H}" rx="6" fill="#{colour}"/>) +
          %(<text x="#{x + 10}" y="#{y + 17}" fill="#fff" font-size="13" font-weight="600">#{h(label)}</text>) +
          %(<text x="#{x + 10}" y="#{y + 32}" fill="#fff" font-size="11">#{h(step['state'])}) +
          %(#{" · #{step['attempts']} attempts" if step['attempts'].to_i > 1}</text></g></a>)
      end
    end
  end
end
